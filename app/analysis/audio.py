"""Audio decoding and normalisation: any common container in, 16-kHz float32 out.

``decode`` reads WAV, FLAC, OGG (Vorbis/Opus) and MP3 with libsndfile (``soundfile``) and falls back
to FFmpeg through PyAV (already installed with faster-whisper) for anything else it can read
(M4A/AAC, WebM, ...). Channels are mixed down, or kept apart for call recordings
(``channels="separate"``: agent left, customer right). Resampling uses soxr (high quality).

Every failure raises a subclass of ``AudioError`` carrying an HTTP status and a machine-readable
code, so the API can answer precisely without guessing.
Thread-safety: all functions are pure and safe to call from any thread.
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


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 600.0
    max_channels: int = 2
    min_sample_rate: int = 4000
    max_sample_rate: int = 192000


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
) -> Audio:
    """Decode bytes or a file path to 16-kHz float32 audio, validating it on the way."""
    data, rate = _read(source, limits)
    return from_array(data, rate, channels=channels, limits=limits)


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


def _read(source, limits: AudioLimits) -> tuple[np.ndarray, int]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise EmptyAudioError("the upload is empty (0 bytes)")
        raw = bytes(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise UndecodableAudioError(f"no such audio file: {path}")
        with open(path, "rb") as fh:
            raw = fh.read()
        if not raw:
            raise EmptyAudioError(f"{path} is empty (0 bytes)")
    try:
        return _read_soundfile(raw, limits)
    except AudioError:
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
    except Exception as exc:
        raise UndecodableAudioError(
            "could not decode the data as audio (supported: WAV, FLAC, OGG/Opus, MP3, and what FFmpeg reads)"
        ) from exc
    with container:
        streams = container.streams.audio
        if not streams:
            raise UndecodableAudioError("the file contains no audio stream")
        stream = streams[0]
        rate = stream.codec_context.sample_rate or stream.rate
        n_channels = stream.codec_context.channels
        if not rate:
            raise UndecodableAudioError("the audio stream has no sample rate")
        _check_rate(rate, limits)
        if n_channels > limits.max_channels:
            raise TooManyChannelsError(f"{n_channels} channels; at most {limits.max_channels} are accepted")
        chunks, total = [], 0
        try:
            for frame in container.decode(stream):
                arr = frame.to_ndarray()
                if frame.format.is_planar:
                    arr = arr.T  # (channels, n) -> (n, channels)
                else:
                    arr = arr.reshape(-1, n_channels)
                arr = _to_float(arr)
                chunks.append(arr)
                total += len(arr)
                _check_duration(total / rate, limits)  # stop early on huge inputs
        except AudioError:
            raise
        except Exception as exc:
            if not chunks:
                raise UndecodableAudioError("the audio stream could not be decoded") from exc
            # a truncated tail: keep what decoded, as players do
    if not chunks:
        raise EmptyAudioError("the audio stream contains no samples")
    return np.concatenate(chunks, axis=0), int(rate)


def _to_float(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    info = np.iinfo(arr.dtype)
    scale = float(max(abs(info.min), info.max))
    offset = 0.0 if info.min < 0 else (info.max + 1) / 2.0
    return ((arr.astype(np.float32) - offset) / scale).astype(np.float32)
