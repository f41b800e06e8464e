"""Tests of app.analysis.features on synthetic signals; librosa (a dev dependency) is the reference where one exists."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from app.analysis import features as F

SR = F.SAMPLE_RATE


def _harmonic(f0: float, seconds: float, n_harmonics: int = 5, amp: float = 0.3) -> np.ndarray:
    """Harmonic tone with 1/k amplitudes (a crude voiced vowel)."""
    t = np.arange(int(seconds * SR)) / SR
    y = sum(amp / k * np.sin(2 * np.pi * f0 * k * t + k) for k in range(1, n_harmonics + 1))
    return y.astype(np.float32)


def _sine(freq: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _noise(seconds: float, std: float = 0.1, seed: int = 0) -> np.ndarray:
    return (std * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture(scope="module")
def librosa():
    # Imported here only: the app must never import it, and its first call is slow (numba JIT).
    return pytest.importorskip("librosa")


@pytest.fixture(scope="module")
def voiced() -> np.ndarray:
    """1 s of a 150-Hz harmonic tone over weak noise: no silent bins, so librosa's top_db is moot."""
    return _harmonic(150.0, 1.0) + _noise(1.0, std=0.01)


# ---------------------------------------------------------------------------------------------
# Shapes, frame convention, finiteness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 159, 160, 161, 400, 8000, 48000, 54321])
def test_shapes_follow_frame_convention(n: int) -> None:
    audio = _noise(n / SR, seed=n)
    t = 1 + n // 160
    feats = F.compute_acoustic(audio)
    assert feats.frames33.shape == (t, 33)
    assert feats.mfcc40.shape == (t, 40)
    assert feats.spectrogram.shape == (t, 200)
    assert feats.logmel_patches.shape[1:] == (96, 64) and feats.logmel_patches.shape[0] >= 1
    assert F.mfcc(audio).shape == (t, 20)
    assert F.mfcc(audio, n_mfcc=13, n_mels=26, win_s=0.032).shape == (t, 13)
    assert F.mfcc_htk40(audio).shape == (t, 40)
    assert F.cqt12(audio).shape == (t, 12)
    assert F.f0_yin(audio).shape == (t,)
    assert F.linear_spectrogram(audio).shape == (t, 200)
    for arr in (*vars(feats).values(), F.waveform_chunks(audio)):
        assert arr.dtype == np.float32


@pytest.mark.parametrize("n", [1, 160, 16000])
def test_silence_and_short_input_are_finite(n: int) -> None:
    silence = np.zeros(n, dtype=np.float32)
    feats = F.compute_acoustic(silence)
    for name, arr in vars(feats).items():
        assert np.isfinite(arr).all(), name
    assert np.all(feats.frames33[:, 32] == 0.0)  # silence is unvoiced
    assert np.all(feats.spectrogram == 0.0)  # log1p(0)
    assert np.isfinite(F.compute_acoustic(_noise(0.01)).frames33).all()


def test_compute_acoustic_equals_the_separate_functions(voiced: np.ndarray) -> None:
    audio = voiced[: int(1.4 * SR)]
    feats = F.compute_acoustic(audio)
    np.testing.assert_allclose(feats.frames33, F.frames33(audio), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats.frames33[:, :20], F.mfcc(audio), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(feats.frames33[:, 20:32], F.cqt12(audio), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats.frames33[:, 32], F.f0_yin(audio), rtol=1e-5)
    np.testing.assert_allclose(feats.mfcc40, F.mfcc_htk40(audio), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(feats.spectrogram, F.linear_spectrogram(audio), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats.logmel_patches, F.vggish_patches(audio), rtol=1e-5, atol=1e-5)


def test_stages_compute_each_feature_alone_and_equal_compute_acoustic(voiced: np.ndarray) -> None:
    audio = voiced[: int(1.4 * SR)]
    feats = F.compute_acoustic(audio)
    for name in ("frames33", "mfcc40", "spectrogram", "logmel_patches"):
        stages = F.AcousticStages(audio)
        assert np.array_equal(getattr(stages, name), getattr(feats, name)), name
        computed = {k for k in ("frames33", "mfcc40", "spectrogram", "logmel_patches") if k in vars(stages)}
        assert computed == {name}  # nothing else was computed on the way


@pytest.mark.parametrize("n_samples", [0, 1, 159, 160, 15040, 15200, 23040, 23200, 48000])
def test_patch_count_is_known_from_the_length(n_samples: int) -> None:
    audio = np.resize(_noise(1.0), n_samples)  # 96 frames make a patch, a tail of 50 frames another
    assert F.n_patches(F.n_frames(n_samples)) == len(F.vggish_patches(audio))


def test_app_import_pulls_no_librosa_numba_or_torch() -> None:
    code = (
        "import sys, app.analysis.features, app.analysis.inputs;"
        " print(sorted({'librosa', 'numba', 'torch'} & set(sys.modules)))"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "[]"


def test_rejects_integer_and_multichannel_audio() -> None:
    with pytest.raises(TypeError):
        F.compute_acoustic(np.zeros(1600, dtype=np.int16))
    with pytest.raises(ValueError):
        F.compute_acoustic(np.zeros((2, 1600), dtype=np.float32))
    with pytest.raises(ValueError):
        F.compute_acoustic(np.full(1600, np.nan, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Against librosa
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("htk", [False, True])
def test_mfcc_matches_librosa(librosa, voiced: np.ndarray, htk: bool) -> None:
    ref = librosa.feature.mfcc(
        y=voiced,
        sr=SR,
        n_mfcc=20,
        n_fft=512,
        hop_length=160,
        win_length=400,
        window="hann",
        n_mels=40,
        htk=htk,
        center=True,
        pad_mode="constant",
    ).T
    ours = F.mfcc(voiced, n_mfcc=20, n_mels=40, win_s=0.025, htk=htk)
    assert ours.shape == ref.shape
    # Same float32 pipeline: differences are rounding only (values reach about 160).
    assert np.abs(ours - ref).max() < 1e-2
    for k in range(20):
        assert np.corrcoef(ours[:, k], ref[:, k])[0, 1] > 0.9999


def test_mfcc_htk40_matches_librosa_chain(librosa, voiced: np.ndarray) -> None:
    import scipy.fft

    pre = librosa.effects.preemphasis(voiced, coef=0.97, zi=[0.0])
    mel = librosa.feature.melspectrogram(
        y=pre,
        sr=SR,
        n_fft=512,
        hop_length=160,
        win_length=400,
        window="hamming",
        power=1.0,
        n_mels=40,
        htk=True,
        norm=None,
        pad_mode="constant",
    )
    ref = scipy.fft.dct(np.log(np.maximum(mel, 1e-10)), type=2, norm="ortho", axis=0).T
    np.testing.assert_allclose(F.mfcc_htk40(voiced), ref, atol=1e-3)


@pytest.mark.parametrize(("f0", "signal"), [(220.0, "sine"), (150.0, "harmonic")])
def test_yin_finds_f0_and_agrees_with_librosa(librosa, f0: float, signal: str) -> None:
    audio = _sine(f0, 1.0) if signal == "sine" else _harmonic(f0, 1.0)
    ours = F.f0_yin(audio)
    interior = ours[3:-3]  # the first and last frames half overlap the zero padding
    assert (interior > 0).all()
    assert abs(np.median(interior) - f0) / f0 < 0.02
    assert np.all(np.abs(interior - f0) / f0 < 0.02)

    ref = librosa.yin(audio, fmin=60.0, fmax=500.0, sr=SR, frame_length=800, hop_length=160, center=True)
    assert ref.shape == ours.shape
    voiced = ours > 0
    assert np.all(np.abs(ours[voiced] - ref[voiced]) / ref[voiced] < 0.01)


def test_yin_unvoiced_on_silence_and_noise() -> None:
    assert np.all(F.f0_yin(np.zeros(SR, dtype=np.float32)) == 0.0)
    assert np.mean(F.f0_yin(_noise(2.0, std=0.1)) > 0) < 0.05
    # A tone then silence: voiced, then unvoiced.
    f0 = F.f0_yin(np.concatenate([_harmonic(200.0, 0.5), np.zeros(SR // 2, dtype=np.float32)]))
    assert np.mean(f0[5:45] > 0) > 0.95 and np.all(f0[56:] == 0.0)


def test_yin_respects_fmin_fmax() -> None:
    assert np.median(F.f0_yin(_harmonic(100.0, 0.5), fmin=60.0, fmax=500.0)[3:-3]) == pytest.approx(
        100.0, rel=0.02
    )
    # An 80-Hz tone below fmin=120 must not be reported as 80 Hz.
    f0 = F.f0_yin(_sine(80.0, 0.5), fmin=120.0, fmax=500.0)
    assert not np.any(np.abs(f0 - 80.0) < 5.0)


# ---------------------------------------------------------------------------------------------
# Spectral features
# ---------------------------------------------------------------------------------------------


def test_linear_spectrogram_peak_bin() -> None:
    spec = F.linear_spectrogram(_sine(1000.0, 0.5))
    peaks = spec[5:-5].argmax(axis=1)
    assert np.all(np.abs(peaks - 50) <= 1)  # 20-Hz bins: 1 kHz is bin 200 * 1000 / 4000


@pytest.mark.parametrize(("freq", "expected_bin"), [(65.41, 0), (261.63, 4), (1046.5, 8), (2960.0, 11)])
def test_cqt_peak_bin(freq: float, expected_bin: int) -> None:
    cqt = F.cqt12(_sine(freq, 0.5))
    assert np.all(cqt[5:-5].argmax(axis=1) == expected_bin)


def test_cqt_reads_amplitude() -> None:
    # Documented scale: a sinusoid of amplitude A at a bin centre (C5, bin 6) reads about ln(A).
    cqt = F.cqt12(_sine(523.25, 0.5, amp=0.5))
    assert np.median(cqt[5:-5, 6]) == pytest.approx(math.log(0.5), abs=0.05)
    # Scaling the input by 10 shifts the log magnitude by ln(10) where the floor does not matter.
    louder = F.cqt12(_sine(523.25, 0.5, amp=0.05))
    np.testing.assert_allclose(cqt[5:-5, 6] - louder[5:-5, 6], math.log(10.0), atol=1e-3)


@pytest.mark.parametrize(("seconds", "patches"), [(0.01, 1), (0.5, 1), (0.96, 1), (3.0, 3), (3.4, 4)])
def test_vggish_patch_count(seconds: float, patches: int) -> None:
    assert F.vggish_patches(_noise(seconds)).shape == (patches, 96, 64)


def test_vggish_padding_and_peak_band() -> None:
    audio = _sine(1000.0, 0.5)
    patch = F.vggish_patches(audio)[0]
    t = 1 + len(audio) // 160
    assert np.all(patch[t:] == np.float32(np.log(0.01)))  # padding is the log-mel of silence
    # 1 kHz lands in the band whose centre (VGGish mel: 1127 ln(1 + f/700), 125-7500 Hz) is nearest.
    mel = lambda hz: 1127.0 * np.log1p(hz / 700.0)  # noqa: E731
    centres = 700.0 * np.expm1(np.linspace(mel(125.0), mel(7500.0), 66)[1:-1] / 1127.0)
    assert np.all(patch[5 : t - 5].argmax(axis=1) == np.argmin(np.abs(centres - 1000.0)))


# ---------------------------------------------------------------------------------------------
# Waveform chunks, segmentation, confidences
# ---------------------------------------------------------------------------------------------


def test_waveform_chunks() -> None:
    audio = _noise(3.0)
    chunks = F.waveform_chunks(audio)
    assert chunks.shape == (1 + (48000 - 4000) // 160, 4000)
    np.testing.assert_array_equal(chunks[7], audio[7 * 160 : 7 * 160 + 4000])
    np.testing.assert_array_equal(chunks[-1], audio[275 * 160 : 275 * 160 + 4000])
    assert not np.shares_memory(chunks, audio)  # a copy: callers may keep it after the audio changes

    short = F.waveform_chunks(audio[:1000])
    assert short.shape == (1, 4000)
    np.testing.assert_array_equal(short[0, :1000], audio[:1000])
    assert np.all(short[0, 1000:] == 0.0)


def test_frame_confidence_rule() -> None:
    w = lambda start, end, confidence: SimpleNamespace(start=start, end=end, confidence=confidence)  # noqa: E731
    words = [w(0.0, 0.10, 0.5), w(0.20, 0.30, 0.8), w(0.25, 0.40, 0.3), w(0.60, 0.60, 0.2)]
    conf = F.frame_confidence(words, 70)
    assert conf.shape == (70,) and conf.dtype == np.float32
    np.testing.assert_array_equal(conf[0:11], 0.5)  # covered, end inclusive (frame 10 at 0.10 s)
    np.testing.assert_array_equal(conf[11:20], 1.0)  # gap: no evidence of error
    np.testing.assert_array_equal(conf[20:25], np.float32(0.8))
    np.testing.assert_array_equal(conf[25:41], np.float32(0.3))  # overlap 0.25-0.30 takes the lower
    np.testing.assert_array_equal(conf[41:60], 1.0)
    assert conf[60] == np.float32(0.2)  # 0.6 / 0.01 is 59.999... in floating point
    np.testing.assert_array_equal(conf[61:], 1.0)
    # Words beyond the frames are ignored; no words at all gives ones.
    assert np.all(F.frame_confidence([w(5.0, 6.0, 0.1)], 10) == 1.0)
    assert np.all(F.frame_confidence([], 4) == 1.0)
