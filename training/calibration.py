"""Calibration (pure functions): expected calibration error and temperature scaling.

* ``ece``: top-label expected calibration error with ``n_bins`` (15) equal-width confidence bins:
  ``sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|``, where a prediction's confidence is
  its largest probability and bin b holds confidences in ((b-1)/n_bins, b/n_bins] (the first bin
  also holds 0).
* ``fit_temperature``: the T > 0 minimising the negative log-likelihood of
  ``softmax(log p / T)`` (Guo et al. 2017), searched on log T (bounded scalar minimisation).
  The models' outputs are probabilities, and ``log p`` are logits up to a per-row constant, which
  the softmax ignores, so scaling ``log p`` is exactly scaling the logits.
* ``out_of_fold_temperature``: each fold's probabilities are calibrated with a temperature fitted on
  the OTHER folds' out-of-fold predictions, so a fold's labels never calibrate its own scores; the
  temperature to ship is fitted on all folds.

Serving applies the temperature with ``app.inference.ensemble.apply_temperature`` (numpy only): the
one implementation, imported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from app.inference.ensemble import apply_temperature

N_BINS = 15
LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]
_FLOOR = 1e-12


def ece(probs: np.ndarray, y: Sequence[int] | np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label expected calibration error, equal-width bins (module docstring)."""
    probs = np.asarray(probs, np.float64)
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.sum() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total / len(y))


def nll(probs: np.ndarray, y: Sequence[int] | np.ndarray) -> float:
    probs = np.asarray(probs, np.float64)
    y = np.asarray(y, np.int64)
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(y)), y], _FLOOR))))


def fit_temperature(probs: np.ndarray, y: Sequence[int] | np.ndarray) -> float:
    """The temperature minimising the NLL of ``apply_temperature(probs, T)`` on labels ``y``."""
    probs = np.asarray(probs, np.float64)
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        return 1.0
    res = minimize_scalar(
        lambda log_t: nll(apply_temperature(probs, float(np.exp(log_t))), y),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(res.x))


def out_of_fold_temperature(
    probs: np.ndarray, y: np.ndarray, fold_of: np.ndarray, fit_mask: np.ndarray | None = None
) -> tuple[np.ndarray, dict[int, float], float]:
    """Calibrated probabilities (each fold scaled with a temperature fitted on the other folds),
    the per-fold temperatures, and the temperature fitted on all folds (the one to ship).

    ``fit_mask`` (bool per row) limits which rows fit a temperature (e.g. one condition only); all
    rows are calibrated. Rows of several conditions of the same clip share its fold."""
    probs, y, fold_of = np.asarray(probs, np.float64), np.asarray(y), np.asarray(fold_of)
    fit_mask = np.ones(len(y), bool) if fit_mask is None else np.asarray(fit_mask, bool)
    out = np.zeros_like(probs)
    per_fold: dict[int, float] = {}
    for f in sorted(set(fold_of.tolist())):
        held = fold_of == f
        train = ~held & fit_mask
        t = fit_temperature(probs[train], y[train])
        per_fold[int(f)] = round(t, 4)
        out[held] = apply_temperature(probs[held], t)
    return out, per_fold, fit_temperature(probs[fit_mask], y[fit_mask])
