"""Training-time augmentation of collated model inputs (numpy, applied per batch).

About 540 training clips from 15 actors is small for models that learn their acoustic front end
from scratch, so every training batch is perturbed the way SpecAugment and noise injection do it,
in the input space the models read (``app.analysis.inputs``), after caching:

* **Feature noise:** Gaussian noise of ``noise`` x the feature's training-split standard deviation
  (from ``trainer.compute_stats``) on every real frame of a frame-sequence input.
* **Time masking:** ``time_masks`` spans, each up to ``time_mask`` of the real frames, are set to the
  feature's training mean (which the graph's ``InputNorm`` maps to zero).
* **Waveform noise:** white noise at a random SNR in ``snr_db`` (the adf input; its graph
  normalises by the valid-sample RMS, so a gain change would be a no-op).

Which input gets which rule is the registry's ``augment`` field (``app.analysis.inputs.INPUTS``).
Exact zero rows are padding for the segment inputs (``ca_mser._nonzero_frames``): their segment mask
marks whole segments, not the zero-padded end of the last one, so rows that are all zero are never
touched. Text inputs are left alone: RAVDESS has two sentences. Nothing here runs at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.analysis.inputs import INPUTS

# the acoustic frame-sequence inputs (noise and time masks); all are standardised by the trainer too
FRAME_INPUTS = tuple(n for n, spec in INPUTS.items() if spec.augment == "frames")
WAVEFORM_INPUTS = tuple(n for n, spec in INPUTS.items() if spec.augment == "waveform")


@dataclass(frozen=True)
class AugmentConfig:
    noise: float = 0.1
    time_mask: float = 0.1
    time_masks: int = 2
    snr_db: tuple[float, float] = (10.0, 40.0)


def _real_rows(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (...) bool: rows that are not all-zero padding."""
    return np.any(x != 0, axis=-1)


def _time_mask(x: np.ndarray, real: np.ndarray, mean: np.ndarray, cfg: AugmentConfig, rng) -> None:
    """In place on one clip's (T, D) frames (segment inputs are flattened to one time axis first)."""
    idx = np.flatnonzero(real)
    if len(idx) < 4 or cfg.time_mask <= 0:
        return
    longest = max(1, int(cfg.time_mask * len(idx)))
    for _ in range(cfg.time_masks):
        width = int(rng.integers(0, longest + 1))
        if not width:
            continue
        start = int(rng.integers(0, len(idx) - width + 1))
        x[idx[start : start + width]] = mean


def augment_frames(
    x: np.ndarray, mean: np.ndarray, std: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """One batched frame input (B, ..., D) -> an augmented copy (padding rows stay zero)."""
    out = np.array(x, dtype=np.float32, copy=True)
    for b in range(out.shape[0]):
        clip = out[b].reshape(-1, out.shape[-1])  # a view: segments flattened to one time axis
        real = _real_rows(clip)
        if cfg.noise > 0:
            noise = rng.standard_normal(clip.shape).astype(np.float32) * (cfg.noise * std)
            clip[real] += noise[real]
        _time_mask(clip, real, mean, cfg, rng)
    return out


def augment_waveform(
    wave: np.ndarray, mask: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """(B, N) waveform batch -> a copy with white noise at a random SNR on the valid samples."""
    out = np.array(wave, dtype=np.float32, copy=True)
    lo, hi = cfg.snr_db
    for b in range(out.shape[0]):
        valid = mask[b] > 0
        power = float(np.mean(np.square(out[b, valid]))) if valid.any() else 0.0
        if power <= 0:
            continue
        snr = rng.uniform(lo, hi)
        sigma = np.sqrt(power / 10 ** (snr / 10))
        out[b, valid] += rng.standard_normal(int(valid.sum())).astype(np.float32) * sigma
    return out


def augment_batch(
    arrays: dict[str, np.ndarray], stats: dict, cfg: AugmentConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Collated inputs -> augmented inputs; inputs without a rule (masks, text) pass unchanged."""
    out = dict(arrays)
    for name, x in arrays.items():
        if name in FRAME_INPUTS and name in stats:
            mean, std = stats[name]
            out[name] = augment_frames(x, mean, std, cfg, rng)
        elif name in WAVEFORM_INPUTS and (mask := INPUTS[name].mask) is not None and mask in arrays:
            out[name] = augment_waveform(x, arrays[mask], cfg, rng)
    return out
