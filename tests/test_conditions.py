"""The call-audio condition (training/conditions.py): band, codec, SNR, level and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from training import conditions as C


def _speechlike(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Harmonics of a 150-Hz voice up to 8 kHz, syllable-modulated, after 0.3 s of silence."""
    t = np.arange(int(C.SAMPLE_RATE * seconds)) / C.SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * 150 * k * t + k) / k for k in range(1, 53))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t))
    x = 0.05 * voice * envelope
    x[: int(0.3 * C.SAMPLE_RATE)] = 0.0
    return (x + 1e-4 * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


def _band_energy(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / C.SAMPLE_RATE)
    return float(spec[(f >= lo) & (f < hi)].sum())


def test_call_audio_keeps_the_telephone_band_and_removes_the_rest():
    x = _speechlike()
    y = C.call_audio(x, seed=3).audio
    assert y.shape == x.shape and y.dtype == np.float32
    inside = _band_energy(y, 400, 3200)
    # above 4 kHz the 8-kHz channel has nothing; below 300 Hz (and 3.4-4 kHz) the band-pass cuts
    assert _band_energy(y, 4200, 8000) < 1e-3 * inside
    assert _band_energy(y, 0, 150) < 0.05 * inside
    # the clean input had most of its high band, and its 150-Hz fundamental, kept
    assert _band_energy(x, 4200, 8000) > 0.01 * _band_energy(x, 400, 3200)
    assert _band_energy(x, 0, 160) > 0.1 * _band_energy(x, 400, 3200)


def test_mulaw_roundtrip_error_is_bounded():
    x = np.linspace(-1, 1, 20001)
    err = np.abs(C.mulaw_roundtrip(x) - x)
    # half a code step (1/mu) in the companded domain times the slope dx/dy = (1 + mu|x|) ln(1 + mu) / mu,
    # which varies by exp(ln(1 + mu) / mu) ~ 2.2 % across half a step: about 2.2 % of |x| + 8.5e-5
    bound = 1.03 * (1 + C.MU * np.abs(x)) * np.log1p(C.MU) / C.MU / C.MU
    assert np.all(err <= bound)
    assert np.max(err[np.abs(x) < 0.01]) < 3e-4  # quiet samples keep fine steps
    speech = _speechlike()
    snr = 10 * np.log10(
        np.sum(speech.astype(np.float64) ** 2) / np.sum((C.mulaw_roundtrip(speech) - speech) ** 2)
    )
    assert snr > 30  # G.711 gives ~38 dB on speech-level signals
    codes = C.mulaw_encode(x)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes.max() == 255
    assert C.mulaw_roundtrip(np.array([2.0, -3.0])).tolist() == pytest.approx([1.0, -1.0])


@pytest.mark.parametrize("kind", ["pink", "brown", "speech", "white"])
@pytest.mark.parametrize("snr", [10.0, 15.0, 20.0])
def test_add_noise_hits_the_snr(kind, snr):
    x = _speechlike().astype(np.float64)
    noise = C.coloured_noise(len(x), kind, np.random.default_rng(1), like=x)
    y = C.add_noise(x, noise, snr)
    measured = 10 * np.log10(C.speech_power(x) / np.mean((y - x) ** 2))
    assert measured == pytest.approx(snr, abs=1e-6)


def test_noise_colours_slope_as_named():
    rng = np.random.default_rng(0)
    n = 160000
    for kind, slope in (("white", 0.0), ("pink", -1.0), ("brown", -2.0)):
        spec = np.abs(np.fft.rfft(C.coloured_noise(n, kind, rng))) ** 2
        f = np.fft.rfftfreq(n, 1 / C.SAMPLE_RATE)
        keep = (f > 100) & (f < 6000)
        fitted = np.polyfit(np.log10(f[keep]), np.log10(spec[keep]), 1)[0]
        assert fitted == pytest.approx(slope, abs=0.1), kind


def test_call_audio_draws_are_in_range_and_deterministic_per_seed():
    x = _speechlike()
    seen = set()
    for seed in range(40):
        a, b = C.call_audio(x, seed), C.call_audio(x, seed)
        assert np.array_equal(a.audio, b.audio) and (a.snr_db, a.gain_db) == (b.snr_db, b.gain_db)
        assert 10.0 <= a.snr_db <= 20.0 and -10.0 <= a.gain_db <= 10.0
        seen.add(a.noise_kind)
    assert seen == set(C.NOISE_KINDS)
    assert not np.array_equal(C.call_audio(x, 0).audio, C.call_audio(x, 1).audio)
    # another clip gets its own draws under the same seed
    assert C.call_audio(x, 0).snr_db != C.call_audio(_speechlike(seed=5), 0).snr_db


def test_call_audio_level_follows_the_drawn_gain():
    x = _speechlike()
    for seed in range(8):
        out = C.call_audio(x, seed)
        # against the same clip through the channel at 0 dB, without noise: noise at >= 10 dB SNR adds
        # at most 0.4 dB of power, and filling the pauses it lets quieter frames count as speech
        reference = C.to_wideband(C.telephone_band(x), len(x))
        level = 10 * np.log10(C.speech_power(out.audio) / C.speech_power(reference))
        assert level == pytest.approx(out.gain_db, abs=1.5)


def test_apply_condition():
    x = _speechlike()
    assert C.apply_condition(x, "clean") is x
    assert np.array_equal(C.apply_condition(x, "call", 2), C.call_audio(x, 2).audio)
    with pytest.raises(ValueError):
        C.apply_condition(x, "radio")
