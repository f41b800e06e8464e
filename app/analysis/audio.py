"""Audio decoding and normalisation: any common container in, 16-kHz float32 out.

``decode`` reads WAV, FLAC, OGG (Vorbis/Opus) and MP3 with libsndfile (``soundfile``) and falls back
to FFmpeg through PyAV (already installed with faster-whisper) for anything else it can read
(M4A/AAC, WebM, ...). Channels are mixed down, or kept apart for call recordings
(``channels="separate"``: agent left, customer right). Resampling uses soxr (high quality).

Every failure raises a subclass of ``AudioError`` carrying an HTTP status and a machine-readable
code, so the API can answer precisely without guessing.

Untrusted input: FFmpeg and libsndfile are C code, and a crafted file can crash them (a SIGSEGV in
PyAV's frame conversion took the whole server down). ``decode`` therefore runs the decoding of
in-memory data (uploads) in a separate worker process (``app.analysis.decoding``): a dying worker
becomes a typed error for that one request. File paths (training data, local files) are decoded in
the calling process unless ``isolate=True``. Inside the decoder every frame is checked against the
first one (channels, rate, sample format) before its samples are touched.

Thread-safety: all functions are pure and safe to call from any thread; the isolated path shares a
thread-safe process pool.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

SAMPLE_RATE = 16000

ChannelMode = Literal["mix", "separate"]


class AudioError(ValueError):
    """Base class: the input cannot be turned into usable audio."""

    status = 422
    code = "invalid_audio"


class UndecodableAudioError(AudioError):
    status = 415
    code = "unsupported_audio"


class EmptyAudioError(AudioError):
    status = 422
    code = "empty_audio"


class AudioTooLongError(AudioError):
    status = 413
    code = "audio_too_long"


class InvalidSamplesError(AudioError):
    status = 422
    code = "invalid_samples"


class TooManyChannelsError(AudioError):
    status = 422
    code = "too_many_channels"


class BadSampleRateError(AudioError):
    status = 422
    code = "bad_sample_rate"


class CorruptAudioError(AudioError):
    """A recognised container/codec whose content is malformed (inconsistent frames, decoder failure).

    422, not 415: the media type is supported, this particular file cannot be processed."""

    status = 422
    code = "undecodable_audio"


class DecoderCrashedError(CorruptAudioError):
    """The isolated decoder process died (segfault, abort) while reading this file."""


class DecodeTimeoutError(CorruptAudioError):
    """The isolated decoder did not finish within its time limit (a decompression bomb or a decoder loop)."""

    code = "decode_timeout"


class DecodeMemoryError(AudioError):
    """Decoding this file needs more memory than a decoder process may use."""

    status = 413
    code = "audio_too_large"


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 600.0
    max_channels: int = 2
    min_sample_rate: int = 4000
    max_sample_rate: int = 192000

    @classmethod
    def from_settings(cls, settings, max_seconds: float) -> AudioLimits:
        """The server's limits (channels, sample rates) with the caller's length bound."""
        return cls(
            max_seconds=max_seconds,
            max_channels=settings.max_channels,
            min_sample_rate=settings.min_sample_rate,
            max_sample_rate=settings.max_sample_rate,
        )


@dataclass
class Audio:
    """Decoded audio at 16 kHz. ``samples`` is (channels, n) float32; mixed audio has one channel."""

    samples: np.ndarray
    source_rate: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return self.samples.shape[1] / SAMPLE_RATE

    @property
    def mono(self) -> np.ndarray:
        return self.samples.mean(axis=0) if self.samples.shape[0] > 1 else self.samples[0]


def decode(
    source: bytes | bytearray | memoryview | str | os.PathLike,
    channels: ChannelMode = "mix",
    limits: AudioLimits = AudioLimits(),
    *,
    isolate: bool | None = None,
) -> Audio:
    """Decode bytes or a file path to 16-kHz float32 audio, validating it on the way.

    ``isolate``: decode in a worker process of the shared decoder pool (``app.analysis.decoding``),
    so that a decoder crash cannot take this process down. ``None`` (default) isolates in-memory
    data (uploads) and decodes file paths (trusted local files, e.g. training data) here.
    """
    if isolate is None:
        isolate = isinstance(source, (bytes, bytearray, memoryview))
    if isolate:
        from app.analysis.decoding import default_pool

        return default_pool().decode(source, channels, limits)
    return decode_local(source, channels, limits)


def decode_local(
    source: bytes | bytearray | memoryview | str | os.PathLike,
    channels: ChannelMode = "mix",
    limits: AudioLimits = AudioLimits(),
) -> Audio:
    """``decode`` in the calling process, without isolation: for trusted files and decoder workers."""
    data, rate = _read(load_bytes(source), limits)
    return from_array(data, rate, channels=channels, limits=limits)


def load_bytes(source: bytes | bytearray | memoryview | str | os.PathLike) -> bytes:
    """The raw bytes of an upload or a file; ``EmptyAudioError`` / ``UndecodableAudioError`` if none."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise EmptyAudioError("the upload is empty (0 bytes)")
        return bytes(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise UndecodableAudioError(f"no such audio file: {path}")
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw:
        raise EmptyAudioError(f"{path} is empty (0 bytes)")
    return raw


def from_array(
    data: np.ndarray, rate: int, channels: ChannelMode = "mix", limits: AudioLimits = AudioLimits()
) -> Audio:
    """Validate and normalise raw samples shaped (n,) or (n, channels), at any sample rate."""
    _check_rate(rate, limits)
    data = np.asarray(data)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise InvalidSamplesError(f"expected samples shaped (n,) or (n, channels), got {data.shape}")
    n, n_channels = data.shape
    if n_channels > limits.max_channels:
        raise TooManyChannelsError(f"{n_channels} channels; at most {limits.max_channels} are accepted")
    if n == 0 or n_channels == 0:
        raise EmptyAudioError("the audio contains no samples")
    _check_duration(n / rate, limits)
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise InvalidSamplesError("the audio contains NaN or infinite samples")
    if channels == "mix" and n_channels > 1:
        data = data.mean(axis=1, keepdims=True)
    samples = np.ascontiguousarray(resample(data, rate, SAMPLE_RATE).T, dtype=np.float32)
    if samples.shape[1] == 0:
        raise EmptyAudioError("the audio is shorter than one sample at 16 kHz")
    return Audio(samples=samples, source_rate=int(rate), source_channels=n_channels)


def resample(data: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """High-quality resampling (soxr 'HQ') of (n,) or (n, channels) float32 data."""
    if rate_in == rate_out:
        return data
    import soxr

    return soxr.resample(data, rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


def _check_rate(rate: int, limits: AudioLimits) -> None:
    if not (limits.min_sample_rate <= rate <= limits.max_sample_rate):
        raise BadSampleRateError(
            f"sample rate {rate} Hz is outside {limits.min_sample_rate}..{limits.max_sample_rate} Hz"
        )


def _check_duration(seconds: float, limits: AudioLimits) -> None:
    if seconds > limits.max_seconds:
        raise AudioTooLongError(f"{seconds:.1f} s of audio; the limit is {limits.max_seconds:.0f} s")


# planar frames with this many channels or more are refused: PyAV finds the planes by walking a
# pointer array that is only NULL-terminated below 8 channels (AV_NUM_DATA_POINTERS)
_MAX_PLANAR_CHANNELS = 7


def _read(raw: bytes, limits: AudioLimits) -> tuple[np.ndarray, int]:
    try:
        return _read_soundfile(raw, limits)
    except (AudioError, MemoryError):
        raise
    except Exception:
        pass  # not something libsndfile reads: let FFmpeg try
    return _read_pyav(raw, limits)


def _read_soundfile(raw: bytes, limits: AudioLimits) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(raw)) as f:
        _check_rate(f.samplerate, limits)
        if f.channels > limits.max_channels:
            raise TooManyChannelsError(f"{f.channels} channels; at most {limits.max_channels} are accepted")
        if f.frames > 0:  # known before decoding: refuse huge inputs without reading them
            _check_duration(f.frames / f.samplerate, limits)
        data = f.read(dtype="float32", always_2d=True)
        return data, f.samplerate


def _read_pyav(raw: bytes, limits: AudioLimits) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(io.BytesIO(raw), mode="r")
    except MemoryError:
        raise
    except Exception as exc:
        raise UndecodableAudioError(
            "could not decode the data as audio (supported: WAV, FLAC, OGG/Opus, MP3, and what FFmpeg reads)"
        ) from exc
    try:
        with container:
            return _decode_stream(container, limits)
    except (AudioError, MemoryError):
        raise
    except Exception as exc:  # AttributeError, ValueError, ... from a malformed stream
        raise CorruptAudioError(f"the audio stream is malformed ({type(exc).__name__})") from exc


def _decode_stream(container, limits: AudioLimits) -> tuple[np.ndarray, int]:
    streams = container.streams.audio
    if not streams:
        raise UndecodableAudioError("the file contains no audio stream")
    stream = streams[0]
    ctx = stream.codec_context
    if ctx is None:  # e.g. a WAV declaring 0 bits per sample: FFmpeg finds no decoder
        raise UndecodableAudioError("no decoder for the audio stream's codec")
    declared_rate = ctx.sample_rate or stream.rate or 0
    if declared_rate:  # refuse early; the first frame is the reference (HE-AAC doubles the rate)
        _check_rate(declared_rate, limits)
    declared_channels = ctx.channels or 0
    if declared_channels > limits.max_channels:
        raise TooManyChannelsError(
            f"{declared_channels} channels; at most {limits.max_channels} are accepted"
        )
    chunks: list[np.ndarray] = []
    total = 0
    ref: tuple[int, int, str] | None = None  # (channels, rate, sample format) of the first frame
    frames = iter(container.decode(stream))
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            break
        except MemoryError:
            raise
        except Exception as exc:
            if not chunks:
                raise UndecodableAudioError("the audio stream could not be decoded") from exc
            break  # a truncated or damaged tail: keep what decoded, as players do
        if frame.samples <= 0:
            continue
        shape = (frame.layout.nb_channels, frame.sample_rate, frame.format.name)
        if ref is None:
            ref = _check_first_frame(shape, frame.format.is_planar, limits)
        elif shape != ref:
            raise CorruptAudioError(
                f"audio frame {len(chunks) + 1} has {shape[0]} channels at {shape[1]} Hz ({shape[2]}); "
                f"the stream started with {ref[0]} channels at {ref[1]} Hz ({ref[2]})"
            )
        _check_duration((total + frame.samples) / ref[1], limits)  # before converting: stop early
        arr = _frame_samples(frame, ref[0])
        chunks.append(arr)
        total += len(arr)
    if not chunks:
        raise EmptyAudioError("the audio stream contains no samples")
    assert ref is not None  # set by the first frame, which also appended the first chunk
    return np.concatenate(chunks, axis=0), int(ref[1])


def _check_first_frame(
    shape: tuple[int, int, str], planar: bool, limits: AudioLimits
) -> tuple[int, int, str]:
    n_channels, rate, fmt = shape
    _check_rate(rate, limits)
    if n_channels > limits.max_channels:
        raise TooManyChannelsError(f"{n_channels} channels; at most {limits.max_channels} are accepted")
    if n_channels < 1:
        raise CorruptAudioError("the audio frames declare no channels")
    if planar and n_channels > _MAX_PLANAR_CHANNELS:
        raise TooManyChannelsError(f"{n_channels} planar channels are not supported")
    if fmt not in _DTYPES:
        raise UndecodableAudioError(f"unsupported decoded sample format {fmt!r}")
    return shape


_DTYPES = {
    "u8": "u1", "u8p": "u1", "s16": "i2", "s16p": "i2", "s32": "i4", "s32p": "i4",
    "flt": "f4", "fltp": "f4", "dbl": "f8", "dblp": "f8",
}  # fmt: skip


def _frame_samples(frame, n_channels: int) -> np.ndarray:
    """(n, channels) float32 samples of a validated frame; never reads past its buffers."""
    dtype = np.dtype(_DTYPES[frame.format.name])
    n = frame.samples
    planar = frame.format.is_planar
    planes = frame.planes
    if len(planes) != (n_channels if planar else 1):
        raise CorruptAudioError(f"an audio frame has {len(planes)} planes for {n_channels} channels")
    count = n if planar else n * n_channels
    if any(plane.buffer_size < count * dtype.itemsize for plane in planes):
        raise CorruptAudioError("an audio frame is shorter than its declared sample count")
    if planar:
        arr = np.stack([np.frombuffer(p, dtype=dtype, count=count) for p in planes], axis=1)
    else:
        arr = np.frombuffer(planes[0], dtype=dtype, count=count).reshape(n, n_channels).copy()
    return _to_float(arr)


def _to_float(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    info = np.iinfo(arr.dtype)
    scale = float(max(abs(info.min), info.max))
    offset = 0.0 if info.min < 0 else (info.max + 1) / 2.0
    return ((arr.astype(np.float32) - offset) / scale).astype(np.float32)
