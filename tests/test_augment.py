"""Training-time augmentation (training/augment.py): what it changes and what it must not touch."""

from __future__ import annotations

import numpy as np
import pytest

from training.augment import AugmentConfig, augment_batch, augment_frames, augment_waveform


def _batch(rng):
    x = rng.standard_normal((2, 2, 50, 4)).astype(np.float32) + 3.0  # (B, S, T, D) like mfcc_seg
    x[0, 1, 20:] = 0.0  # zero padding of the last segment
    x[1, 1] = 0.0  # a whole padded segment
    return x


def test_padding_rows_stay_zero_and_real_rows_change():
    rng = np.random.default_rng(0)
    x = _batch(rng)
    mean, std = np.full(4, 3.0, np.float32), np.ones(4, np.float32)
    y = augment_frames(x, mean, std, AugmentConfig(noise=0.1, time_mask=0.2), np.random.default_rng(1))
    pad = ~np.any(x != 0, axis=-1)
    assert np.all(y[pad] == 0.0)
    assert not np.allclose(y[~pad], x[~pad])
    assert np.all(x[0, 0] == _batch(np.random.default_rng(0))[0, 0])  # input not modified


def test_noise_scale_follows_feature_std():
    x = np.ones((1, 20000, 2), np.float32)
    mean, std = np.zeros(2, np.float32), np.array([1.0, 10.0], np.float32)
    y = augment_frames(x, mean, std, AugmentConfig(noise=0.1, time_mask=0.0), np.random.default_rng(0))
    assert np.std(y[0] - x[0], axis=0) == pytest.approx([0.1, 1.0], rel=0.05)


def test_time_mask_sets_spans_to_the_mean():
    x = np.ones((1, 100, 3), np.float32)
    mean = np.full(3, 7.0, np.float32)
    cfg = AugmentConfig(noise=0.0, time_mask=0.3, time_masks=2)
    y = augment_frames(x, mean, np.ones(3, np.float32), cfg, np.random.default_rng(3))
    masked = np.all(y[0] == 7.0, axis=-1)
    assert 0 < masked.sum() <= 60
    assert np.all(y[0][~masked] == 1.0)


def test_waveform_noise_hits_the_requested_snr_on_valid_samples_only():
    rng = np.random.default_rng(0)
    wave = np.zeros((1, 32000), np.float32)
    wave[0, :16000] = np.sin(np.arange(16000) / 5.0).astype(np.float32)
    mask = np.zeros_like(wave)
    mask[0, :16000] = 1.0
    y = augment_waveform(wave, mask, AugmentConfig(snr_db=(20.0, 20.0)), rng)
    noise = y[0, :16000] - wave[0, :16000]
    snr = 10 * np.log10(np.mean(wave[0, :16000] ** 2) / np.mean(noise**2))
    assert snr == pytest.approx(20.0, abs=0.3)
    assert np.all(y[0, 16000:] == 0.0)


def test_batch_leaves_masks_and_text_alone():
    rng = np.random.default_rng(0)
    arrays = {
        "frames33": rng.standard_normal((2, 10, 33)).astype(np.float32),
        "frames33_mask": np.ones((2, 10), np.float32),
        "words": rng.standard_normal((2, 3, 8)).astype(np.float32),
    }
    stats = {"frames33": (np.zeros(33, np.float32), np.ones(33, np.float32))}
    out = augment_batch(arrays, stats, AugmentConfig(), np.random.default_rng(1))
    assert out["frames33_mask"] is arrays["frames33_mask"] and out["words"] is arrays["words"]
    assert not np.allclose(out["frames33"], arrays["frames33"])
