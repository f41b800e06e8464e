"""Acoustic inputs of the four emotion models, from 16-kHz mono float32 audio.

Pure numpy/scipy on purpose: librosa would drag numba in, whose JIT costs the server tens of seconds
on its first request. ``tests/test_features.py`` checks the librosa-compatible parts against librosa.

Conventions shared by every frame-level feature:

* Hop ``HOP`` = 160 samples (10 ms). Frame ``i`` is centred on sample ``i * HOP`` and the signal is
  zero-padded by half a window on both sides (librosa ``center=True, pad_mode="constant"``), so an
  utterance of ``N`` samples gives ``T = 1 + N // HOP`` frames whatever the window length. Zero rather
  than reflect padding because reflection is undefined for clips shorter than half a window.
* Windows are periodic (the DFT-even form used by librosa, scipy ``fftbins=True`` and VGGish). A
  window shorter than its DFT is zero-padded; only magnitudes are used, which that padding's
  position cannot change.
* All outputs are finite float32: every logarithm has a floor or an offset, so digital silence and
  10-ms clips are fine.

``AcousticStages`` frames the signal once with the longest window (800 samples) and slices the
shorter, equally centred windows out of those frames; MFCC-20 and the VGGish log-mel share one FFT.
Each feature is computed on first use, so a server running only some models pays only for the
features they read (``app.analysis.inputs``). ``compute_acoustic`` computes all four: six real FFTs
of ``T`` frames and one inverse FFT (YIN).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Protocol

import numpy as np
import scipy.fft

SAMPLE_RATE = 16000
HOP = 160

# Frame lengths in samples. All are even, so a frame's centre sample sits at index length // 2.
WIN_25MS = 400  # MFCC-20, MFCC-40, VGGish log-mel
WIN_40MS = 640  # CA-MSER linear spectrogram
WIN_50MS = 800  # YIN and the pseudo-CQT
NFFT_25MS = 512
NFFT_SPEC = 800
NFFT_CQT = 1024

PREEMPHASIS = 0.97
SPEC_BINS = 200  # bins 0..199 of an 800-point DFT at 16 kHz: 0..3980 Hz in 20-Hz steps

CQT_FMIN = 65.406  # C2
CQT_BINS = 12
CQT_BINS_PER_OCTAVE = 2
CQT_FLOOR = 1e-5  # about -100 dBFS: keeps log finite on digital silence

MFCC_DB_FLOOR = 1e-10  # librosa power_to_db's amin
HTK_LOG_FLOOR = 1e-10

VGGISH_BANDS = 64
VGGISH_FMIN = 125.0
VGGISH_FMAX = 7500.0
VGGISH_LOG_OFFSET = 0.01
VGGISH_PATCH = 96  # frames per patch (0.96 s)
VGGISH_MIN_TAIL = 50  # frames (0.5 s) a trailing partial patch needs to be kept

YIN_THRESHOLD = 0.1


@dataclass
class AcousticFeatures:
    """Every acoustic input of the four models for one utterance (``T = 1 + N // HOP``)."""

    frames33: np.ndarray  # (T, 33): MFCC-20 | CQT-12 log magnitude | F0 in Hz (0 = unvoiced)  -- cmt-awc
    mfcc40: np.ndarray  # (T, 40): HTK-style MFCC  -- ca-mser
    spectrogram: np.ndarray  # (T, 200): log(1 + |STFT|), 0..4 kHz  -- ca-mser
    logmel_patches: np.ndarray  # (P, 96, 64): VGGish log-mel patches, P >= 1  -- 3m-ser


class TimedWord(Protocol):
    """What ``frame_confidence`` needs from an ASR word (read-only attributes suffice)."""

    @property
    def start(self) -> float: ...

    @property
    def end(self) -> float: ...

    @property
    def confidence(self) -> float: ...


# ---------------------------------------------------------------------------------------------
# Framing and spectra
# ---------------------------------------------------------------------------------------------


def n_frames(n_samples: int) -> int:
    """Frame count of ``n_samples`` of audio under the centred 10-ms-hop convention."""
    return 1 + n_samples // HOP


def _as_audio(audio: np.ndarray) -> np.ndarray:
    """Validate and return ``audio`` as a contiguous 1-D float32 array."""
    a = np.asarray(audio)
    if a.dtype.kind not in "fc" and a.size:
        # An int16 buffer would pass silently with values 32768 times too large.
        raise TypeError(f"audio must be floating point in [-1, 1], got {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 1:
        raise ValueError(f"audio must be 1-D mono, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("audio contains NaN or inf")
    return a


def _frames(audio: np.ndarray, length: int) -> np.ndarray:
    """(T, length) read-only view of centred, zero-padded frames at hop ``HOP``."""
    half = length // 2
    padded = np.pad(audio, (half, length - half))
    # N + length padded samples leave N + 1 window starts, of which every HOP-th gives 1 + N // HOP.
    view = np.lib.stride_tricks.sliding_window_view(padded, length)[::HOP]
    return view[: n_frames(len(audio))]


def _centre(frames: np.ndarray, length: int) -> np.ndarray:
    """The centred ``length``-sample part of wider centred frames: the same frames as ``_frames(audio, length)``."""
    lo = (frames.shape[1] - length) // 2
    return frames[:, lo : lo + length]


@lru_cache(maxsize=32)
def _window(kind: str, length: int) -> np.ndarray:
    """Periodic window as float32 (read-only, cached)."""
    phase = 2.0 * np.pi * np.arange(length) / length
    if kind == "hann":
        w = 0.5 - 0.5 * np.cos(phase)
    elif kind == "hamming":
        w = 0.54 - 0.46 * np.cos(phase)
    else:
        raise ValueError(f"unknown window {kind!r}")
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def _magnitude(frames: np.ndarray, window: str, n_fft: int) -> np.ndarray:
    """|rfft| of windowed frames: (T, n_fft // 2 + 1) float32."""
    spec = scipy.fft.rfft(frames * _window(window, frames.shape[1]), n=n_fft, axis=1)
    return np.abs(spec)


def _preemphasis(audio: np.ndarray, coef: float = PREEMPHASIS) -> np.ndarray:
    """``y[n] = x[n] - coef * x[n-1]`` with ``x[-1] = 0`` (librosa ``preemphasis(zi=[0])``, as in CA-MSER).

    Applied to the whole signal before framing, not per frame as HTK does (HTK rescales each
    frame's first sample instead of using the previous one).
    """
    out = np.empty_like(audio)
    out[:1] = audio[:1]
    np.subtract(audio[1:], np.float32(coef) * audio[:-1], out=out[1:])
    return out


# ---------------------------------------------------------------------------------------------
# Filterbanks (all cached: building them costs more than applying them)
# ---------------------------------------------------------------------------------------------


# Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above.
_SLANEY_F_SP = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: float | np.ndarray, htk: bool) -> np.ndarray:
    """Hz to mel: HTK ``2595 log10(1 + f/700)``, or Slaney (linear below 1 kHz, log above)."""
    hz = np.asarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    log_part = (
        _SLANEY_MIN_LOG_MEL
        + np.log(np.maximum(hz, _SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
    )
    return np.where(hz >= _SLANEY_MIN_LOG_HZ, log_part, hz / _SLANEY_F_SP)


def _mel_to_hz(mel: np.ndarray, htk: bool) -> np.ndarray:
    """Inverse of ``_hz_to_mel``."""
    mel = np.asarray(mel, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    log_part = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (mel - _SLANEY_MIN_LOG_MEL))
    return np.where(mel >= _SLANEY_MIN_LOG_MEL, log_part, _SLANEY_F_SP * mel)


@lru_cache(maxsize=32)
def mel_filterbank(
    n_fft: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    slaney_norm: bool = True,
) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular mel filters, equal to ``librosa.filters.mel``.

    Triangles are linear in Hz between mel-spaced edges; ``slaney_norm`` scales each to unit area
    (librosa's default ``norm="slaney"``), otherwise peaks are 1 (HTK).
    """
    fmax = SAMPLE_RATE / 2.0 if fmax is None else fmax
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / SAMPLE_RATE)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin, htk), _hz_to_mel(fmax, htk), n_mels + 2), htk)
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if slaney_norm:
        weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=32)
def _vggish_mel_matrix(n_fft: int = NFFT_25MS) -> np.ndarray:
    """(n_fft // 2 + 1, 64) mel matrix of the VGGish reference code (``mel_features.py``).

    Differs from ``mel_filterbank``: triangles are linear in mel (``1127 ln(1 + f/700)``), peaks are
    1, and the DC bin is zeroed. Kept exact so that a pretrained VGGish state dict sees its own input.
    """
    n_bins = n_fft // 2 + 1
    bins_mel = 1127.0 * np.log1p(np.linspace(0.0, SAMPLE_RATE / 2.0, n_bins) / 700.0)
    edges = np.linspace(
        1127.0 * np.log1p(VGGISH_FMIN / 700.0), 1127.0 * np.log1p(VGGISH_FMAX / 700.0), VGGISH_BANDS + 2
    )
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins_mel[None, :] - lower) / (centre - lower)
    falling = (upper - bins_mel[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling)).T
    weights[0, :] = 0.0
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=32)
def _dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_in, n_out) orthonormal DCT-II basis: ``x @ D`` equals ``scipy.fft.dct(x, norm="ortho")[:n_out]``."""
    n = np.arange(n_in)[:, None]
    k = np.arange(n_out)[None, :]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    basis[:, 0] /= np.sqrt(2.0)
    basis = basis.astype(np.float32)
    basis.setflags(write=False)
    return basis


@lru_cache(maxsize=32)
def _cq_filterbank(n_fft: int = NFFT_CQT) -> np.ndarray:
    """(n_fft // 2 + 1, 12) constant-Q filterbank over an STFT's power bins.

    Bin ``k`` is a triangle on the log-frequency axis centred on ``CQT_FMIN * 2**(k/2)`` whose feet
    are the neighbouring centres (half an octave away), so the bandwidth is a constant fraction of
    the centre frequency. Peaks are 1 and neighbours sum to 1, so a band's weighted power counts
    a sinusoid's whole spectral lobe once. A triangle narrower than the DFT grid falls back to its
    nearest DFT bin.
    """
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / SAMPLE_RATE)
    centres = CQT_FMIN * 2.0 ** (np.arange(CQT_BINS) / CQT_BINS_PER_OCTAVE)
    with np.errstate(divide="ignore"):
        log_hz = np.log2(fft_hz)  # -inf at DC, which gets weight 0
    distance = CQT_BINS_PER_OCTAVE * np.abs(log_hz[:, None] - np.log2(centres)[None, :])
    weights = np.maximum(0.0, 1.0 - distance)
    for k in np.flatnonzero(weights.sum(axis=0) == 0.0):
        weights[np.argmin(np.abs(fft_hz - centres[k])), k] = 1.0
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


# ---------------------------------------------------------------------------------------------
# Features from frames (shared by the public functions and compute_acoustic)
# ---------------------------------------------------------------------------------------------


def _mfcc_from_power(
    power: np.ndarray, n_fft: int, n_mfcc: int, n_mels: int, htk: bool, fmin: float, fmax: float | None
) -> np.ndarray:
    """librosa's MFCC chain on a power spectrogram: Slaney-normalised mel, dB, orthonormal DCT-II."""
    mel = power @ mel_filterbank(n_fft, n_mels, fmin, fmax, htk, True).T
    db = 10.0 * np.log10(np.maximum(mel, np.float32(MFCC_DB_FLOOR)))
    return db @ _dct_matrix(n_mels, n_mfcc)


def _mfcc_htk40_from_frames(pre_frames: np.ndarray) -> np.ndarray:
    """HTK-style MFCC-40 from pre-emphasised 25-ms frames (see ``mfcc_htk40``)."""
    mag = _magnitude(pre_frames, "hamming", NFFT_25MS)
    mel = mag @ mel_filterbank(NFFT_25MS, 40, 0.0, None, True, False).T
    return np.log(np.maximum(mel, np.float32(HTK_LOG_FLOOR))) @ _dct_matrix(40, 40)


def _vggish_logmel(mag: np.ndarray) -> np.ndarray:
    """(T, 64) VGGish log-mel from the 25-ms Hann magnitude spectrum."""
    return np.log(mag @ _vggish_mel_matrix(NFFT_25MS) + np.float32(VGGISH_LOG_OFFSET))


def _cqt_from_frames(frames50: np.ndarray) -> np.ndarray:
    """(T, 12) pseudo-CQT log magnitude from 50-ms frames (see ``cqt12``)."""
    window = _window("hann", frames50.shape[1])
    mag = _magnitude(frames50, "hann", NFFT_CQT)
    band_power = (mag * mag) @ _cq_filterbank(NFFT_CQT)
    # By Parseval, a sinusoid of amplitude A puts A^2 n_fft sum(w^2) / 4 into the positive
    # frequencies; this scale makes a sinusoid at a bin centre read A.
    scale = np.float32(4.0 / (NFFT_CQT * float(np.sum(window.astype(np.float64) ** 2))))
    return np.log(np.sqrt(band_power * scale) + np.float32(CQT_FLOOR))


def _spectrogram_from_frames(frames40: np.ndarray) -> np.ndarray:
    """(T, 200) log(1 + |STFT|) from 40-ms frames (see ``linear_spectrogram``)."""
    return np.log1p(_magnitude(frames40, "hamming", NFFT_SPEC)[:, :SPEC_BINS])


def _yin_from_frames(
    frames: np.ndarray, fmin: float, fmax: float, threshold: float = YIN_THRESHOLD
) -> np.ndarray:
    """Vectorised YIN (de Cheveigne & Kawahara 2002) on (T, L) frames; 0.0 where unvoiced.

    As in ``librosa.yin``: the difference function compares the first half of each frame with its
    lagged copies, ``d(tau) = sum_{j < W} (x_j - x_{j+tau})^2`` with ``W = L // 2``, expanded as
    ``E(0) + E(tau) - 2 r(tau)`` with ``r`` from one FFT cross-correlation. Unlike librosa, a frame
    whose cumulative-mean-normalised difference never dips below ``threshold`` is unvoiced (0.0)
    instead of taking the global minimum, and a frame with no energy is unvoiced too. The longest
    period searched is ``min(ceil(sr / fmin), L - W - 2)`` samples (267 for 60 Hz and L = 800).
    """
    n_t, length = frames.shape
    win = length // 2
    min_period = max(1, int(math.floor(SAMPLE_RATE / fmax)))
    max_period = min(int(math.ceil(SAMPLE_RATE / fmin)), length - win - 2)
    if max_period <= min_period:
        raise ValueError(f"frame of {length} samples is too short for fmin={fmin} Hz")
    n_lags = max_period + 2  # one lag beyond the search range for parabolic interpolation

    # No circular wrap-around: the largest index reached, win - 1 + n_lags - 1, is below the FFT size.
    spec_head = scipy.fft.rfft(frames[:, :win], n=length, axis=1)
    spec_full = scipy.fft.rfft(frames, n=length, axis=1)
    r = scipy.fft.irfft(np.conj(spec_head) * spec_full, n=length, axis=1)[:, :n_lags]

    energy = np.zeros((n_t, length + 1), dtype=np.float32)
    np.cumsum(frames * frames, axis=1, out=energy[:, 1:])
    e_lag = energy[:, win : win + n_lags] - energy[:, :n_lags]
    diff = np.maximum(e_lag[:, :1] + e_lag - 2.0 * r, 0.0)

    # Cumulative mean normalised difference d'(tau) = d(tau) * tau / sum_{1..tau} d; d'(0) = 1.
    cum = np.cumsum(diff[:, 1:], axis=1)
    tau = np.arange(1, n_lags, dtype=np.float32)
    # A cumulative difference this small next to the frame energy is float32 rounding (silence or
    # DC): leave d' = 1 there so the frame is unvoiced instead of dividing noise by noise.
    scale = e_lag[:, :1] * np.float32(1e-7)
    valid = cum > scale
    cmnd = np.ones_like(diff)
    np.divide(diff[:, 1:] * tau, cum, out=cmnd[:, 1:], where=valid)

    # First trough (strict fall, then no rise) below the threshold inside [min_period, max_period].
    mid = cmnd[:, min_period : max_period + 1]
    trough = (mid < cmnd[:, min_period - 1 : max_period]) & (mid <= cmnd[:, min_period + 1 : max_period + 2])
    candidate = trough & (mid < threshold)
    voiced = candidate.any(axis=1)
    period = min_period + np.argmax(candidate, axis=1)

    rows = np.arange(n_t)
    left, centre, right = cmnd[rows, period - 1], cmnd[rows, period], cmnd[rows, period + 1]
    curvature = left - 2.0 * centre + right
    shift = np.zeros_like(centre)
    np.divide(0.5 * (left - right), curvature, out=shift, where=np.abs(curvature) > 1e-12)
    shift = np.clip(shift, -1.0, 1.0)

    f0 = SAMPLE_RATE / (period + shift)
    return np.where(voiced, f0, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Public feature functions
# ---------------------------------------------------------------------------------------------


def mfcc(
    audio: np.ndarray,
    n_mfcc: int = 20,
    n_mels: int = 40,
    win_s: float = 0.025,
    htk: bool = False,
    n_fft: int | None = None,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """(T, n_mfcc) MFCC, matching ``librosa.feature.mfcc`` with the same parameters.

    Periodic Hann window of ``win_s`` inside an ``n_fft``-point DFT (default: the next power of
    two), power spectrum, Slaney-normalised mel filters (Slaney or, with ``htk``, HTK mel scale),
    ``10 log10(max(mel, 1e-10))``, orthonormal DCT-II. One difference: librosa's default
    ``top_db=80`` clips each utterance relative to its own loudest bin; that is not done here, so a
    frame's value never depends on the rest of the utterance (it matches librosa ``top_db=None``).
    """
    audio = _as_audio(audio)
    win = int(round(win_s * SAMPLE_RATE))
    n_fft = n_fft or 1 << (win - 1).bit_length()
    if n_fft < win:
        raise ValueError(f"n_fft={n_fft} is shorter than the {win}-sample window")
    mag = _magnitude(_frames(audio, win), "hann", n_fft)
    return _mfcc_from_power(mag * mag, n_fft, n_mfcc, n_mels, htk, fmin, fmax)


def mfcc_htk40(audio: np.ndarray) -> np.ndarray:
    """(T, 40) HTK-style MFCC for CA-MSER.

    Exact choices: pre-emphasis 0.97 on the whole signal (``x[-1] = 0``); 25-ms periodic Hamming
    window in a 512-point DFT; magnitude (not power) spectrum, as HTK's default ``USEPOWER=F``;
    40 HTK-mel triangles over 0-8000 Hz with unit peaks (no area normalisation); natural log with a
    floor of 1e-10; orthonormal DCT-II keeping all 40 coefficients (c0 first, no liftering).
    The CA-MSER code instead calls ``librosa.feature.mfcc(n_mfcc=40, htk=True)`` with librosa's
    128-ms Hann default; the 25-ms window keeps this feature on the same frames as the others.
    """
    audio = _as_audio(audio)
    return _mfcc_htk40_from_frames(_frames(_preemphasis(audio), WIN_25MS))


def cqt12(audio: np.ndarray) -> np.ndarray:
    """(T, 12) pseudo-CQT: log magnitude of 12 constant-Q bins from C2 (65.4 Hz), 2 per octave.

    Centres ``65.41 * 2**(k/2)`` Hz reach 2.96 kHz. Computed as a constant-Q filterbank (see
    ``_cq_filterbank``) over one STFT: 50-ms periodic Hann window in a 1024-point DFT. A true CQT
    with 2 bins per octave (Q = 2.41) uses a 37-ms window at C2, so 50 ms resolves the lowest bin
    about as well; higher bins span many DFT bins, whose power they sum.
    Value: ``ln(sqrt(band power) + 1e-5)``, scaled so that a sinusoid of amplitude A at a bin
    centre reads about ``ln A`` (0.97 A from 500 Hz up, 0.77 A at C2, where the window's spectral
    lobe is as wide as the band); broadband energy reads higher in the wider high bands.
    """
    audio = _as_audio(audio)
    return _cqt_from_frames(_frames(audio, WIN_50MS))


def f0_yin(audio: np.ndarray, fmin: float = 60.0, fmax: float = 500.0, frame_s: float = 0.050) -> np.ndarray:
    """(T,) fundamental frequency in Hz by YIN, 0.0 where unvoiced or silent.

    Frames of ``frame_s`` centred on each hop (librosa ``yin(frame_length=800, center=True)``),
    threshold 0.1 on the cumulative mean normalised difference, parabolic interpolation.
    """
    audio = _as_audio(audio)
    return _yin_from_frames(_frames(audio, int(round(frame_s * SAMPLE_RATE))), fmin, fmax)


def frames33(audio: np.ndarray) -> np.ndarray:
    """(T, 33) cmt-awc frames: ``[MFCC-20 | CQT-12 | F0 Hz]`` (see ``mfcc``, ``cqt12``, ``f0_yin``)."""
    audio = _as_audio(audio)
    frames50 = _frames(audio, WIN_50MS)
    mag25 = _magnitude(_centre(frames50, WIN_25MS), "hann", NFFT_25MS)
    return _frames33_from(mag25, frames50)


def _frames33_from(mag25: np.ndarray, frames50: np.ndarray) -> np.ndarray:
    """Assemble frames33 from the 25-ms Hann magnitude spectrum and the 50-ms frames."""
    out = np.empty((frames50.shape[0], 33), dtype=np.float32)
    out[:, :20] = _mfcc_from_power(mag25 * mag25, NFFT_25MS, 20, 40, False, 0.0, None)
    out[:, 20:32] = _cqt_from_frames(frames50)
    out[:, 32] = _yin_from_frames(frames50, 60.0, 500.0)
    return out


def linear_spectrogram(audio: np.ndarray) -> np.ndarray:
    """(T, 200) CA-MSER spectrogram: ``ln(1 + |STFT|)`` for 0..3980 Hz.

    40-ms periodic Hamming window in an 800-point DFT (20-Hz bins), first 200 bins, unnormalised
    magnitude (librosa ``stft`` scale). The CA-MSER code uses ``amplitude_to_db(ref=np.max)``,
    which depends on the utterance's loudest bin; ``log1p`` is per-frame and silence maps to 0.
    """
    audio = _as_audio(audio)
    return _spectrogram_from_frames(_frames(audio, WIN_40MS))


def n_patches(n_t: int) -> int:
    """VGGish patch count of ``n_t`` frames (rules in ``vggish_patches``): known from the length alone,
    so inputs on the same patch grid (``enc_patches``) need not compute the log-mel."""
    n_full, tail = divmod(n_t, VGGISH_PATCH)
    return n_full + (1 if tail >= VGGISH_MIN_TAIL or n_full == 0 else 0)


def _patches(logmel: np.ndarray) -> np.ndarray:
    """Cut (T, 64) log-mel into (P, 96, 64) patches (rules in ``vggish_patches``)."""
    n_t = logmel.shape[0]
    count = n_patches(n_t)
    # Padding frames hold the log-mel of digital silence, ln(0 + 0.01): what zero-padding the
    # waveform gives, so a padded patch looks like a pause rather than a flat loud spectrum.
    out = np.full((count * VGGISH_PATCH, VGGISH_BANDS), np.log(VGGISH_LOG_OFFSET), dtype=np.float32)
    keep = min(n_t, count * VGGISH_PATCH)
    out[:keep] = logmel[:keep]
    return out.reshape(count, VGGISH_PATCH, VGGISH_BANDS)


def vggish_patches(audio: np.ndarray) -> np.ndarray:
    """(P, 96, 64) VGGish log-mel patches, P >= 1.

    As VGGish's ``mel_features.log_mel_spectrogram``: 25-ms periodic Hann window, 512-point DFT
    magnitude, 64 mel bands 125-7500 Hz (VGGish's own mel matrix), ``ln(mel + 0.01)``; then
    non-overlapping 96-frame (0.96 s) patches. Differences from the reference: frames are centred
    (``T = 1 + N // 160``, the reference does not pad), and a trailing partial patch holding at
    least 0.5 s -- or the only patch of a clip shorter than 0.96 s -- is padded with silence
    (``ln 0.01``) instead of being dropped.
    """
    audio = _as_audio(audio)
    mag = _magnitude(_frames(audio, WIN_25MS), "hann", NFFT_25MS)
    return _patches(_vggish_logmel(mag))


def waveform_chunks(audio: np.ndarray, chunk_s: float = 0.25, shift_s: float = 0.010) -> np.ndarray:
    """(C, chunk) raw-waveform windows every ``shift_s``: ``C = 1 + (N - chunk) // shift``.

    ADF evaluates SincNet on 250-ms chunks shifted by 10 ms. Audio shorter than one chunk is
    zero-padded to one chunk. The result is a copy (C x 16 kB: about 47 MB for 30 s of audio).
    """
    audio = _as_audio(audio)
    chunk = int(round(chunk_s * SAMPLE_RATE))
    shift = int(round(shift_s * SAMPLE_RATE))
    if len(audio) < chunk:
        audio = np.pad(audio, (0, chunk - len(audio)))
    return np.lib.stride_tricks.sliding_window_view(audio, chunk)[::shift].copy()


def frame_confidence(
    words: Iterable[TimedWord], n_frames: int, hop_s: float = HOP / SAMPLE_RATE
) -> np.ndarray:
    """(T,) per-frame ASR confidence for cmt-awc's confidence matrix.

    Frame ``i`` (centre ``i * hop_s``) takes the confidence of the word whose ``[start, end]``
    covers it (bounds inclusive, with 1e-9 hop of slack against float rounding), the lowest one where
    words overlap, and 1.0 where no word covers it: the ASR offers no evidence of error in silence.
    Confidences are clipped to [0, 1]; a word with a NaN confidence is ignored.
    """
    conf = np.full(n_frames, np.inf)
    for w in words:
        c = float(w.confidence)
        if math.isnan(c):
            continue
        first = max(0, math.ceil(float(w.start) / hop_s - 1e-9))
        last = min(n_frames - 1, math.floor(float(w.end) / hop_s + 1e-9))
        if last >= first:
            np.minimum(conf[first : last + 1], min(max(c, 0.0), 1.0), out=conf[first : last + 1])
    conf[np.isinf(conf)] = 1.0
    return conf.astype(np.float32)


class AcousticStages:
    """The acoustic features of one utterance, each computed on first use and kept.

    Why: the four features cost six FFTs over the whole utterance, but a server running one model
    reads one or two of them. Attribute names match ``AcousticFeatures``, so code that reads features
    takes either. The stages share what they can: ``frames50`` is a view that the 25-ms and 40-ms
    windows are sliced from, and ``mag25`` (25-ms Hann FFT) feeds both MFCC-20 and the VGGish log-mel.
    Not thread-safe for concurrent first use of one instance (a stage may then be computed twice,
    with equal results); create one per utterance and per caller.
    """

    def __init__(self, audio: np.ndarray):
        self.audio = _as_audio(audio)

    @cached_property
    def frames50(self) -> np.ndarray:
        """(T, 800) centred 50-ms frames; the shorter windows are centred slices of these."""
        return _frames(self.audio, WIN_50MS)

    @cached_property
    def mag25(self) -> np.ndarray:
        """(T, 257) magnitude of the 25-ms periodic Hann window in a 512-point DFT."""
        return _magnitude(_centre(self.frames50, WIN_25MS), "hann", NFFT_25MS)

    @cached_property
    def frames33(self) -> np.ndarray:
        """(T, 33) ``[MFCC-20 | CQT-12 | F0 Hz]`` (see ``frames33``)."""
        return _frames33_from(self.mag25, self.frames50)

    @cached_property
    def mfcc40(self) -> np.ndarray:
        """(T, 40) HTK-style MFCC (see ``mfcc_htk40``); its own pre-emphasised framing."""
        return _mfcc_htk40_from_frames(_frames(_preemphasis(self.audio), WIN_25MS))

    @cached_property
    def spectrogram(self) -> np.ndarray:
        """(T, 200) log(1 + |STFT|), 0..4 kHz (see ``linear_spectrogram``)."""
        return _spectrogram_from_frames(_centre(self.frames50, WIN_40MS))

    @cached_property
    def logmel_patches(self) -> np.ndarray:
        """(P, 96, 64) VGGish log-mel patches (see ``vggish_patches``)."""
        return _patches(_vggish_logmel(self.mag25))


def compute_acoustic(audio: np.ndarray) -> AcousticFeatures:
    """All acoustic inputs of one utterance, sharing one framing and the 25-ms Hann FFT."""
    stages = AcousticStages(audio)
    return AcousticFeatures(
        frames33=stages.frames33,
        mfcc40=stages.mfcc40,
        spectrogram=stages.spectrogram,
        logmel_patches=stages.logmel_patches,
    )
