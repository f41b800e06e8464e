"""app.analysis.audio: formats, channel handling, resampling, and every typed error."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import soundfile as sf

from app.analysis import audio as A

CLIP = "kids_angry_a01.flac"


def _encode(data: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def speech(fixtures_dir):
    data, rate = sf.read(fixtures_dir / CLIP, dtype="float32")
    assert rate == 16000
    return data


@pytest.mark.parametrize(
    "fmt,subtype",
    [
        ("WAV", "PCM_16"),
        ("WAV", "FLOAT"),
        ("FLAC", None),
        ("OGG", "OPUS"),
        ("OGG", "VORBIS"),
        ("MP3", "MPEG_LAYER_III"),
    ],
)
def test_decodes_common_formats(speech, fmt, subtype):
    out = A.decode(_encode(speech, 16000, fmt, subtype))
    assert out.samples.dtype == np.float32 and out.samples.shape[0] == 1
    # lossy codecs add delay/padding; duration must still match within 60 ms
    assert abs(out.duration_s - len(speech) / 16000) < 0.06
    if subtype in ("PCM_16", "FLOAT", None):
        assert np.allclose(out.samples[0], speech, atol=1e-4)


def test_decodes_from_path(fixtures_dir, speech):
    out = A.decode(fixtures_dir / CLIP)
    assert np.allclose(out.samples[0], speech, atol=1e-6)


def test_pyav_fallback_reads_what_libsndfile_cannot(speech):
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format="adts") as container:  # AAC: not a libsndfile format
        stream = container.add_stream("aac", rate=16000)
        pcm = (speech * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(sf.LibsndfileError):  # the premise: libsndfile cannot read AAC
        sf.read(io.BytesIO(buf.getvalue()))
    out = A.decode(buf.getvalue())
    assert abs(out.duration_s - len(speech) / 16000) < 0.15
    assert np.abs(out.samples).max() > 0.05


def test_resamples_to_16k_with_a_real_resampler():
    rate = 44100
    t = np.arange(rate) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out = A.decode(_encode(tone, rate, "WAV", "FLOAT"))
    assert out.samples.shape == (1, 16000)
    spectrum = np.abs(np.fft.rfft(out.samples[0]))
    assert abs(np.argmax(spectrum) - 1000) <= 1  # 1 Hz bins over 1 s
    assert out.source_rate == rate


def test_stereo_mix_and_separate(speech):
    stereo = np.stack([speech, np.zeros_like(speech)], axis=1)
    raw = _encode(stereo, 16000, "WAV", "FLOAT")
    mixed = A.decode(raw, channels="mix")
    separate = A.decode(raw, channels="separate")
    assert mixed.samples.shape[0] == 1 and separate.samples.shape[0] == 2
    assert np.allclose(mixed.samples[0], speech / 2, atol=1e-6)
    assert np.allclose(separate.samples[0], speech, atol=1e-6) and not separate.samples[1].any()


def test_integer_pcm_from_arrays_is_scaled():
    pcm = (np.sin(np.linspace(0, 100, 16000)) * 32767).astype(np.int16)
    out = A.from_array(pcm.astype(np.float32) / 32768, 16000)
    assert 0.9 < np.abs(out.samples).max() <= 1.0


@pytest.mark.parametrize(
    "payload,error,status",
    [
        (b"", A.EmptyAudioError, 422),
        (b"\x00\x01garbage" * 200, A.UndecodableAudioError, 415),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", A.UndecodableAudioError, 415),
    ],
)
def test_bad_bytes(payload, error, status):
    with pytest.raises(error) as exc:
        A.decode(payload)
    assert exc.value.status == status and str(exc.value)


def test_wav_with_zero_frames_is_empty():
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    with pytest.raises(A.EmptyAudioError):
        A.decode(buf.getvalue())


def test_too_long_is_refused_before_decoding():
    raw = _encode(np.zeros(16000 * 5, np.float32), 16000, "WAV", "PCM_16")
    with pytest.raises(A.AudioTooLongError) as exc:
        A.decode(raw, limits=A.AudioLimits(max_seconds=2))
    assert exc.value.status == 413


def test_nan_samples():
    data = np.zeros(1600, np.float32)
    data[100] = np.nan
    with pytest.raises(A.InvalidSamplesError):
        A.decode(_encode(data, 16000, "WAV", "FLOAT"))


def test_too_many_channels():
    raw = _encode(np.zeros((1600, 3), np.float32), 16000, "WAV", "FLOAT")
    with pytest.raises(A.TooManyChannelsError):
        A.decode(raw)
    assert A.decode(raw, limits=A.AudioLimits(max_channels=4)).samples.shape[0] == 1


@pytest.mark.parametrize("rate", [1000, 384000])
def test_absurd_sample_rates(rate):
    raw = _encode(np.zeros(rate // 10, np.float32), rate, "WAV", "FLOAT")
    with pytest.raises(A.BadSampleRateError):
        A.decode(raw)


# --- malformed containers, decoded in this process (the frame checks, without the isolation) ------


def test_wav_without_a_decoder_is_415_not_a_crash():
    from tests.fuzz_decode import edge_cases

    with pytest.raises(A.UndecodableAudioError) as exc:  # 0 bits per sample: PyAV has no codec context
        A.decode_local(edge_cases()["wav_bps0.wav"])
    assert exc.value.status == 415


def test_frames_that_change_channel_count_are_refused():
    pytest.importorskip("av")
    from tests.fuzz_decode import edge_cases

    data = edge_cases()["adts_stereo_then_mono.aac"]  # used to be a ValueError (500) in np.concatenate
    with pytest.raises(A.CorruptAudioError) as exc:
        A.decode_local(data)
    assert (exc.value.status, exc.value.code) == (422, "undecodable_audio")
    assert "1 channels" in str(exc.value)


def test_bytes_are_decoded_in_a_worker_process():
    from app.analysis import decoding

    before = decoding.default_pool().stats["jobs"]
    A.decode(_encode(np.zeros(1600, np.float32), 16000, "WAV", "FLOAT"))
    assert decoding.default_pool().stats["jobs"] == before + 1
