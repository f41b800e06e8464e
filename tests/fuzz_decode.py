"""Seeded, bounded fuzzing of ``app.analysis.audio.decode`` through the isolated decoder pool.

Every case must either decode to finite float32 16-kHz audio within the limits, or raise an
``AudioError`` subclass with a 4xx status: never another exception, never a dead test process
(the decoders run in ``app.analysis.decoding`` worker processes; a worker that dies is reported as
``DecoderCrashedError`` and counted apart, since the frame checks should stop crafted files first).

Inputs: the clips in ``tests/fixtures`` and small generated seeds (WAV, FLAC, OGG Vorbis/Opus, MP3,
ADTS AAC, M4A), mutated by bit flips, byte runs, truncations, slice edits, splices, header field
rewrites (WAV fmt/data, FLAC STREAMINFO, MP4 ``mp4a``/``esds``, Opus/Vorbis headers with their Ogg
CRC fixed) and channel-count edits; plus fixed edge cases (``edge_cases``): WAV with 0 bits per
sample, a 0-Hz rate, huge declared sizes and channel counts, AAC whose frames change channel count
(up to 38 channels through an in-band program config element: the file that used to SIGSEGV).

Standalone::

    python -m tests.fuzz_decode --n 5000 --seed 1          # report outcomes by class
    python -m tests.fuzz_decode --write-corpus             # refresh tests/fixtures/fuzz/

Thread-safety: single-threaded helpers; the pool is the shared, thread-safe one.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import struct
import sys
import time
import wave
from pathlib import Path

import numpy as np

from app.analysis import audio as A

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = FIXTURES / "fuzz"
LIMITS = A.AudioLimits(max_seconds=30.0)  # small: keeps decoded cases cheap; the limits are what is tested
SEED_SECONDS = 0.3


# --- seeds --------------------------------------------------------------------------------------


def _tone(seconds: float, rate: int, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1)
    return x.astype(np.float32)


def _sf(data: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _av_encode(fmt: str, codec: str, layout: str, rate: int, seconds: float, packet_hook=None) -> bytes:
    """Encode a tone with PyAV; ``packet_hook(index, packet_bytes) -> bytes | None`` may rewrite packets."""
    import av

    channels = av.AudioLayout(layout).nb_channels
    pcm = (_tone(seconds, rate, channels).T * 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="s16p", layout=layout)
        frame.sample_rate = rate
        packets = list(stream.encode(frame)) + list(stream.encode(None))
        for i, packet in enumerate(packets):
            data = packet_hook(i, bytes(packet)) if packet_hook else None
            if data is not None:
                new = av.Packet(data)
                new.pts, new.dts, new.time_base = packet.pts, packet.dts, packet.time_base
                new.stream = stream
                packet = new
            out.mux(packet)
    return buf.getvalue()


def seeds() -> dict[str, bytes]:
    """Small valid files of every format the decoder reads, plus the (truncated) test fixtures."""
    out: dict[str, bytes] = {}
    mono, stereo = _tone(SEED_SECONDS, 16000, 1), _tone(SEED_SECONDS, 16000, 2)
    out["pcm16.wav"] = _sf(stereo, 16000, "WAV", "PCM_16")
    out["u8.wav"] = _sf(mono, 16000, "WAV", "PCM_U8")
    out["float.wav"] = _sf(mono, 16000, "WAV", "FLOAT")
    out["pcm24.flac"] = _sf(stereo, 16000, "FLAC", "PCM_24")
    out["vorbis.ogg"] = _sf(stereo, 16000, "OGG", "VORBIS")
    out["opus.ogg"] = _sf(mono, 16000, "OGG", "OPUS")
    out["mp3.mp3"] = _sf(mono, 16000, "MP3", "MPEG_LAYER_III")
    out["aiff.aiff"] = _sf(mono, 16000, "AIFF", "PCM_16")
    try:
        out["adts.aac"] = _av_encode("adts", "aac", "stereo", 16000, SEED_SECONDS)
        out["m4a.m4a"] = _av_encode("mp4", "aac", "stereo", 16000, SEED_SECONDS)
    except Exception:  # an FFmpeg build without the AAC encoder: the other seeds still run
        pass
    for path in sorted(FIXTURES.glob("*.*")):
        if path.suffix in (".flac", ".wav"):
            out[path.name] = path.read_bytes()[:24_000]  # a truncated tail is itself a case
    return out


# --- AAC with an in-band program config element (PCE): frames that change channel count ---------


class _Bits:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def put(self, value: int, n: int) -> None:
        self.bits.extend((value >> i) & 1 for i in range(n - 1, -1, -1))

    def tobytes(self) -> bytes:
        while len(self.bits) % 8:
            self.bits.append(0)
        return bytes(int("".join(map(str, self.bits[i : i + 8])), 2) for i in range(0, len(self.bits), 8))


def aac_pce_block(front_cpes: int = 15, side_cpes: int = 4, sf_index: int = 8) -> bytes:
    """A raw AAC-LC data block: a PCE declaring ``2 * (front + side)`` channels, one silent CPE, END."""
    b = _Bits()
    b.put(5, 3)  # ID_PCE
    b.put(0, 4)  # element_instance_tag
    b.put(1, 2)  # object type: LC
    b.put(sf_index, 4)
    for n in (front_cpes, side_cpes, 0):
        b.put(n, 4)  # front, side, back elements
    b.put(0, 2)  # lfe
    b.put(0, 3)  # assoc data
    b.put(0, 4)  # valid cc
    b.put(0, 3)  # no mono/stereo/matrix mixdown
    for tag in range(front_cpes + side_cpes):
        b.put(1, 1)  # is_cpe
        b.put(tag, 4)
    while len(b.bits) % 8:
        b.put(0, 1)
    b.put(0, 8)  # comment_field_bytes
    b.put(1, 3)  # ID_CPE
    b.put(0, 4)  # tag 0
    b.put(0, 1)  # no common window
    for _ in range(2):  # a silent individual channel stream: max_sfb 0
        b.put(100, 8)  # global gain
        b.put(0, 1 + 2 + 1 + 6 + 1)  # ics_info: reserved, long window, shape, max_sfb 0, no predictor
        b.put(0, 3)  # no pulse, tns, gain control
    b.put(7, 3)  # ID_END
    return b.tobytes()


def _adts_header(payload: int, sf_index: int, chan_cfg: int) -> bytes:
    b = _Bits()
    b.put(0xFFF, 12)
    b.put(0, 1 + 2)  # MPEG-4, layer 0
    b.put(1, 1)  # no CRC
    b.put(1, 2)  # profile: LC
    b.put(sf_index, 4)
    b.put(0, 1)
    b.put(chan_cfg, 3)
    b.put(0, 4)
    b.put(payload + 7, 13)
    b.put(0x7FF, 11)
    b.put(0, 2)
    return b.tobytes()


def adts_frames(data: bytes) -> list[bytes]:
    frames, i = [], 0
    while i + 7 <= len(data) and data[i] == 0xFF and (data[i + 1] & 0xF0) == 0xF0:
        size = ((data[i + 3] & 3) << 11) | (data[i + 4] << 3) | (data[i + 5] >> 5)
        if size < 7:
            break
        frames.append(data[i : i + size])
        i += size
    return frames


def edge_cases() -> dict[str, bytes]:
    """Hand-built inputs that used to crash or give 500s, and limit edge cases."""
    cases: dict[str, bytes] = {}
    pcm = (_tone(0.2, 16000, 1)[:, 0] * 32767).astype("<i2").tobytes()

    def wav(channels=1, rate=16000, bits=16, fmt_tag=1, data=pcm, data_size=None, block=None, riff=None):
        block = block if block is not None else channels * bits // 8
        fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
        size = len(data) if data_size is None else data_size
        body = (
            b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
        )
        return b"RIFF" + struct.pack("<I", len(body) if riff is None else riff) + body

    cases["wav_bps0.wav"] = wav(bits=0, block=2)
    cases["wav_bps0_block0.wav"] = wav(bits=0, block=0)
    cases["wav_rate0.wav"] = wav(rate=0)
    cases["wav_rate_max.wav"] = wav(rate=0xFFFFFFFF // 2)
    cases["wav_huge_data.wav"] = wav(data_size=0xFFFFFFF0, riff=0xFFFFFFF0)
    cases["wav_65535ch.wav"] = wav(channels=65535, block=2)
    cases["wav_38ch_block2.wav"] = wav(channels=38, block=2)
    cases["wav_bps7.wav"] = wav(bits=7)
    cases["wav_bps64_int.wav"] = wav(bits=64)
    cases["wav_fmt_tag_ffff.wav"] = wav(fmt_tag=0xFFFF)
    cases["wav_float_bps16.wav"] = wav(fmt_tag=3)
    cases["wav_mulaw_rate0.wav"] = wav(fmt_tag=7, bits=8, rate=0, data=pcm[:1000])
    w = io.BytesIO()
    with wave.open(w, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
    cases["wav_no_frames.wav"] = w.getvalue()
    try:
        stereo = _av_encode("adts", "aac", "stereo", 16000, 0.6)
        mono = _av_encode("adts", "aac", "mono", 16000, 0.3)
        frames = adts_frames(stereo)
        block = aac_pce_block()
        evil = _adts_header(len(block), 8, 0) + block
        cases["adts_pce38_frame4.aac"] = b"".join(frames[:3]) + evil + b"".join(frames[3:])
        cases["adts_pce38_first.aac"] = evil + b"".join(frames)
        cases["adts_stereo_then_mono.aac"] = stereo + mono
        cases["adts_pce64.aac"] = (
            b"".join(frames[:2]) + _adts_header(len(aac_pce_block(15, 15)), 8, 0) + aac_pce_block(15, 15)
        )
        # M4A: the AudioSpecificConfig says stereo; the 4th packet carries a PCE for 38 channels
        cases["m4a_pce38_packet4.m4a"] = _av_encode(
            "mp4", "aac", "stereo", 16000, 0.6, lambda i, data: block if i == 3 else None
        )
    except Exception:
        pass
    return cases


# --- mutations ----------------------------------------------------------------------------------


def _ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
            crc &= 0xFFFFFFFF
    return crc


def _fix_ogg_crcs(data: bytearray) -> bytearray:
    i = data.find(b"OggS")
    while 0 <= i and i + 27 <= len(data):
        nseg = data[i + 26]
        end = i + 27 + nseg + sum(data[i + 27 : i + 27 + nseg])
        if end > len(data):
            break
        page = bytearray(data[i:end])
        page[22:26] = b"\0\0\0\0"
        data[i + 22 : i + 26] = struct.pack("<I", _ogg_crc(bytes(page)))
        i = data.find(b"OggS", end)
    return data


_INTERESTING = [0, 1, 2, 3, 6, 7, 8, 38, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


def _rewrite_header(data: bytearray, rng: np.random.Generator) -> bytearray:
    """Rewrite one header field that says how much, how many channels, or how fast."""
    value = int(rng.choice(_INTERESTING)) if rng.random() < 0.7 else int(rng.integers(0, 1 << 32))
    targets = []
    if data[:4] == b"RIFF" and (j := data.find(b"fmt ")) >= 0:
        f = j + 8
        targets += [(f + 2, "<H"), (f + 4, "<I"), (f + 8, "<I"), (f + 12, "<H"), (f + 14, "<H"), (4, "<I")]
        if (d := data.find(b"data")) >= 0:
            targets.append((d + 4, "<I"))
    if data[:4] == b"fLaC":
        # STREAMINFO: rate (20 bits) | channels-1 (3) | bps-1 (5) | total samples (36) from byte 18
        word = int.from_bytes(data[18:26], "big")
        field = rng.integers(4)
        shift, width = [(44, 20), (41, 3), (36, 5), (0, 36)][field]
        word = (word & ~(((1 << width) - 1) << shift)) | ((value & ((1 << width) - 1)) << shift)
        data[18:26] = word.to_bytes(8, "big")
        return data
    if (j := data.find(b"mp4a")) >= 0:
        targets += [(j + 20, ">H"), (j + 22, ">H"), (j + 28, ">H")]  # channelcount, samplesize, rate
        if (e := data.find(b"\x05\x02", j)) >= 0 and rng.random() < 0.5:  # AudioSpecificConfig
            asc = int.from_bytes(data[e + 2 : e + 4], "big")
            asc = (asc & ~(0xF << 3)) | ((value & 0xF) << 3) if rng.random() < 0.6 else asc ^ (value & 0xFFFF)
            data[e + 2 : e + 4] = (asc & 0xFFFF).to_bytes(2, "big")
            return data
    if (j := data.find(b"OpusHead")) >= 0:
        targets += [(j + 9, "<B"), (j + 12, "<I"), (j + 18, "<B")]  # channels, rate, mapping family
    if (j := data.find(b"\x01vorbis")) >= 0:
        targets += [(j + 11, "<B"), (j + 12, "<I")]  # channels, rate
    if data[:2] == b"\xff\xf1" or data[:2] == b"\xff\xf9":  # ADTS: a channel config in one frame
        frames = adts_frames(bytes(data))
        if frames:
            k = int(rng.integers(len(frames)))
            offset = sum(len(f) for f in frames[:k])
            data[offset + 2] = (data[offset + 2] & 0xFE) | ((value >> 2) & 1)
            data[offset + 3] = (data[offset + 3] & 0x3F) | ((value & 3) << 6)
            return data
    if not targets:
        return _flip(data, rng)
    offset, fmt = targets[int(rng.integers(len(targets)))]
    size = struct.calcsize(fmt)
    if offset + size <= len(data):
        data[offset : offset + size] = struct.pack(fmt, value & ((1 << (8 * size)) - 1))
    if b"OggS" in data[:4]:
        _fix_ogg_crcs(data)
    return data


def _flip(data: bytearray, rng: np.random.Generator) -> bytearray:
    for _ in range(int(rng.integers(1, 17))):
        # mostly the first KB: headers are where the interesting parsing happens
        pos = int(rng.integers(min(len(data), 1024))) if rng.random() < 0.7 else int(rng.integers(len(data)))
        data[pos] ^= 1 << int(rng.integers(8))
    return data


def mutate(data: bytes, rng: np.random.Generator, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        if not out:
            break
        op = rng.integers(8)
        n = len(out)
        if op == 0:
            out = _flip(out, rng)
        elif op == 1:  # overwrite a run with random or extreme bytes
            pos, k = int(rng.integers(n)), int(rng.integers(1, 9))
            fill = (
                rng.integers(0, 256, k, dtype=np.uint8).tobytes() if rng.random() < 0.5 else bytes([0xFF]) * k
            )
            out[pos : pos + k] = fill[: max(0, n - pos)]
        elif op == 2:  # truncate
            out = out[: int(rng.integers(1, n + 1))]
        elif op == 3:  # delete a slice
            a = int(rng.integers(n))
            del out[a : a + int(rng.integers(1, 512))]
        elif op == 4:  # duplicate a slice
            a = int(rng.integers(n))
            out[a:a] = out[a : a + int(rng.integers(1, 2048))]
        elif op == 5:  # splice with another seed
            other = pool[int(rng.integers(len(pool)))]
            cut = int(rng.integers(n))
            out = out[:cut] + other[int(rng.integers(len(other))) :]
        else:  # header fields, channel counts (two chances in eight)
            out = _rewrite_header(out, rng)
    if out[:4] == b"OggS":
        _fix_ogg_crcs(out)
    return bytes(out)


def cases(n: int, seed: int) -> list[tuple[str, bytes]]:
    """The edge cases, then ``n`` mutations of the seeds (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    base = seeds()
    names = sorted(base)
    pool = [base[k] for k in names]
    out = list(edge_cases().items())
    for i in range(n):
        k = int(rng.integers(len(names)))
        out.append((f"{names[k]}#{i}", mutate(base[names[k]], rng, pool)))
    return out


# --- checking ---------------------------------------------------------------------------------


def outcome(pool, data: bytes, channels: str = "mix") -> str:
    """ "ok" or the AudioError class name; raises AssertionError on anything the contract forbids."""
    try:
        audio = pool.decode(data, channels, LIMITS)
    except A.AudioError as exc:
        assert 400 <= exc.status < 500, f"{type(exc).__name__} has status {exc.status}"
        assert exc.code and str(exc), f"{type(exc).__name__} without code or detail"
        return type(exc).__name__
    s = audio.samples
    assert isinstance(s, np.ndarray) and s.dtype == np.float32 and s.ndim == 2, (type(s), s.dtype, s.ndim)
    assert (
        1 <= s.shape[0] <= LIMITS.max_channels and 0 < s.shape[1] <= LIMITS.max_seconds * A.SAMPLE_RATE + 160
    )
    assert np.isfinite(s).all()
    assert LIMITS.min_sample_rate <= audio.source_rate <= LIMITS.max_sample_rate
    return "ok"


def run(n: int, seed: int, pool=None, verbose: bool = False, channels: str = "mix") -> dict:
    """Run the fuzz cases; returns {"cases", "seconds", "outcomes", "crashes", "failures"}."""
    from app.analysis.decoding import DecodePool

    own = pool is None
    pool = pool or DecodePool(workers=1, memory_mb=1024, timeout_s=10.0)
    counts: collections.Counter[str] = collections.Counter()
    crashes: list[str] = []
    failures: list[str] = []
    t0 = time.perf_counter()
    try:
        for name, data in cases(n, seed):
            try:
                result = outcome(pool, data, channels)
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
                result = "FAILED"
            except Exception as exc:  # the contract: nothing but AudioError may escape
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                result = f"UNEXPECTED {type(exc).__name__}"
            counts[result] += 1
            if result in ("DecoderCrashedError", "DecodeTimeoutError"):
                crashes.append(name)
            if verbose:
                print(f"{name:40s} {len(data):8d} B  {result}")
    finally:
        if own:
            pool.close()
    return {
        "cases": sum(counts.values()),
        "seconds": round(time.perf_counter() - t0, 2),
        "outcomes": dict(counts.most_common()),
        "crashes": crashes,
        "failures": failures,
    }


def write_corpus(directory: Path = CORPUS) -> dict[str, str]:
    """Store the edge cases (small files) and their expected outcome in ``expected.json``."""
    from app.analysis.decoding import DecodePool

    directory.mkdir(parents=True, exist_ok=True)
    expected = {}
    pool = DecodePool(workers=1, memory_mb=1024, timeout_s=10.0)
    try:
        for name, data in edge_cases().items():
            if len(data) > 16_000:
                continue
            (directory / name).write_bytes(data)
            expected[name] = outcome(pool, data)
    finally:
        pool.close()
    (directory / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return expected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="mutated cases (plus the fixed edge cases)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--channels", choices=["mix", "separate"], default="mix")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--write-corpus", action="store_true", help=f"rewrite {CORPUS}")
    args = parser.parse_args(argv)
    if args.write_corpus:
        print(json.dumps(write_corpus(), indent=1))
        return 0
    report = run(args.n, args.seed, verbose=args.verbose, channels=args.channels)
    print(json.dumps(report, indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
