"""Evaluation and augmentation conditions: a clean 16-kHz clip -> the same clip as a phone call.

``call_audio(audio, seed)`` is a pure, seeded function (same input and seed -> the same output,
bit for bit). It models the path of a caller's voice to a contact-centre recording, in order:

1. **Level change** of the talker: a gain drawn from ``gain_db`` (default ±10 dB).
2. **Background noise** at the microphone: an SNR drawn from ``snr_db`` (default 10-20 dB) against
   the speech power (mean square over the samples whose envelope is within 30 dB of the loudest,
   so a clip's leading silence does not lower the reference). The noise kind is drawn from
   ``noise_kinds``: ``pink`` (1/f), ``brown`` (1/f^2, rumble, traffic) or ``speech`` (random-phase
   noise with the long-term magnitude spectrum of the clip itself: babble-like without borrowing
   other speakers, so a test speaker's noise never comes from a training speaker or the reverse).
3. **Telephone band**: resampled to 8 kHz (``scipy.signal.resample_poly``, whose anti-aliasing
   filter removes everything above 4 kHz) and band-passed 300-3400 Hz (Butterworth, order 4 per
   edge, causal, as a channel filter is).
4. **G.711 mu-law** (mu = 255, 8 bits per sample) encode/decode round trip; samples beyond full
   scale clip, as a codec's input does.
5. Back to 16 kHz (``resample_poly``), the length of the input.

Not modelled (stated, not hidden): low-bitrate codecs (AMR-NB, Opus at 6-12 kbit/s), packet loss,
echo and AGC; no codec library ships a wheel here that training may use.

Everything is numpy/scipy; nothing here is imported by ``app`` (the server never makes call audio).
Thread-safety: pure functions; each call builds its own RNG from its seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy import signal

SAMPLE_RATE = 16000
PHONE_RATE = 8000
BAND_HZ = (300.0, 3400.0)
MU = 255
NOISE_KINDS = ("pink", "brown", "speech")
CONDITIONS = ("clean", "call")


@dataclass(frozen=True)
class CallConfig:
    """The ranges a call-audio version of a clip is drawn from."""

    snr_db: tuple[float, float] = (10.0, 20.0)
    gain_db: tuple[float, float] = (-10.0, 10.0)
    noise_kinds: tuple[str, ...] = NOISE_KINDS
    band_hz: tuple[float, float] = BAND_HZ
    filter_order: int = 4

    def to_dict(self) -> dict:
        return {
            "snr_db": list(self.snr_db),
            "gain_db": list(self.gain_db),
            "noise_kinds": list(self.noise_kinds),
            "band_hz": list(self.band_hz),
            "filter_order": self.filter_order,
            "codec": "G.711 mu-law (mu=255, 8 bit) at 8 kHz",
        }


@dataclass(frozen=True)
class CallAudio:
    """One call-audio clip and the draws that made it."""

    audio: np.ndarray  # (N,) float32 at 16 kHz, the input's length
    snr_db: float
    gain_db: float
    noise_kind: str


# ---------------------------------------------------------------------------------- primitives


def mulaw_encode(x: np.ndarray, mu: int = MU) -> np.ndarray:
    """[-1, 1] floats -> uint8 codes (continuous mu-law companding, 2^8 uniform levels; values
    beyond full scale clip)."""
    x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.round((y + 1.0) / 2.0 * mu).astype(np.uint8)


def mulaw_decode(codes: np.ndarray, mu: int = MU) -> np.ndarray:
    y = np.asarray(codes, np.float64) / mu * 2.0 - 1.0
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu).astype(np.float32)


def mulaw_roundtrip(x: np.ndarray, mu: int = MU) -> np.ndarray:
    return mulaw_decode(mulaw_encode(x, mu), mu)


def speech_power(x: np.ndarray, floor_db: float = 30.0, frame: int = 320) -> float:
    """Mean square of the 20-ms frames whose power is within ``floor_db`` of the loudest frame
    (an active-speech level, P.56 in spirit): leading and trailing silence do not count."""
    x = np.asarray(x, np.float64)
    n = len(x) // frame
    if n == 0:
        return float(np.mean(np.square(x))) if len(x) else 0.0
    p = np.mean(np.square(x[: n * frame].reshape(n, frame)), axis=1)
    if p.max() <= 0:
        return 0.0
    active = p >= p.max() * 10 ** (-floor_db / 10)
    return float(p[active].mean())


def coloured_noise(n: int, kind: str, rng: np.random.Generator, like: np.ndarray | None = None) -> np.ndarray:
    """Unit-power noise of ``n`` samples: ``pink`` (power ~ 1/f), ``brown`` (~ 1/f^2), ``white``, or
    ``speech`` (the magnitude spectrum of ``like`` with random phases)."""
    if n == 0:
        return np.zeros(0)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    f[0] = f[1] if n > 1 else 1.0
    if kind == "pink":
        spec /= np.sqrt(f)
    elif kind == "brown":
        spec /= f
    elif kind == "speech":
        if like is None or not np.any(like):
            raise ValueError("speech-shaped noise needs the clip it is shaped like")
        mag = np.abs(np.fft.rfft(np.asarray(like, np.float64), n))
        # smooth the magnitude over ~50 Hz so the noise has the clip's envelope, not its harmonics
        width = max(1, int(round(50.0 / (SAMPLE_RATE / n))))
        mag = np.convolve(mag, np.ones(width) / width, mode="same")
        spec = mag * np.exp(1j * rng.uniform(0, 2 * np.pi, len(mag)))
    elif kind != "white":
        raise ValueError(f"unknown noise kind {kind!r}; choose from pink, brown, white, speech")
    spec[0] = 0.0  # no DC
    noise = np.fft.irfft(spec, n)
    power = float(np.mean(np.square(noise)))
    return noise / np.sqrt(power) if power > 0 else noise


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``x`` plus ``noise`` scaled so that speech_power(x) / mean(noise^2) = ``snr_db``."""
    x = np.asarray(x, np.float64)
    p_noise = float(np.mean(np.square(noise)))
    p_speech = speech_power(x)
    if p_noise <= 0 or p_speech <= 0:
        return x.copy()
    return x + noise * np.sqrt(p_speech / p_noise / 10 ** (snr_db / 10))


def telephone_band(x: np.ndarray, band_hz: tuple[float, float] = BAND_HZ, order: int = 4) -> np.ndarray:
    """16 kHz -> 8 kHz, band-passed ``band_hz`` (causal Butterworth)."""
    y = signal.resample_poly(np.asarray(x, np.float64), PHONE_RATE, SAMPLE_RATE)
    sos = signal.butter(order, band_hz, btype="bandpass", fs=PHONE_RATE, output="sos")
    return signal.sosfilt(sos, y)


def to_wideband(y: np.ndarray, n: int) -> np.ndarray:
    """8 kHz -> 16 kHz, cut or zero-padded to ``n`` samples."""
    z = signal.resample_poly(np.asarray(y, np.float64), SAMPLE_RATE, PHONE_RATE)
    out = np.zeros(n)
    out[: min(n, len(z))] = z[:n]
    return out


# ---------------------------------------------------------------------------------- the condition


def clip_seed(audio: np.ndarray, seed: int) -> list[int]:
    """An RNG seed for one clip: the condition seed and a hash of the clip's samples, so every clip
    gets its own draws and the same clip always gets the same ones."""
    digest = hashlib.sha256(np.ascontiguousarray(audio, np.float32).tobytes()).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def call_audio(audio: np.ndarray, seed: int = 0, config: CallConfig = CallConfig()) -> CallAudio:
    """A 16-kHz mono clip -> the same clip heard through a phone call (module docstring)."""
    x = np.asarray(audio, np.float64).reshape(-1)
    rng = np.random.default_rng(clip_seed(x, seed))
    gain_db = float(rng.uniform(*config.gain_db))
    snr_db = float(rng.uniform(*config.snr_db))
    kind = str(config.noise_kinds[int(rng.integers(len(config.noise_kinds)))])
    x = x * 10 ** (gain_db / 20)
    noisy = add_noise(x, coloured_noise(len(x), kind, rng, like=x), snr_db)
    coded = mulaw_roundtrip(telephone_band(noisy, config.band_hz, config.filter_order))
    out = to_wideband(coded, len(x)).astype(np.float32)
    return CallAudio(out, snr_db, gain_db, kind)


def apply_condition(audio: np.ndarray, condition: str, seed: int = 0) -> np.ndarray:
    """``clean`` -> the audio unchanged; ``call`` -> ``call_audio(audio, seed).audio``."""
    if condition == "clean":
        return audio
    if condition == "call":
        return call_audio(audio, seed).audio
    raise ValueError(f"unknown condition {condition!r}; choose from {', '.join(CONDITIONS)}")
