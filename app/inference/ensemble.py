"""How the server calibrates each model's probabilities and combines them into the ensemble.

Calibration (temperature scaling): a model card may carry ``"calibration": {"temperature": T}``,
fitted out-of-fold by ``python -m training calibrate``; the engine applies
``apply_temperature(p, T) = softmax(log p / T)`` to that model's probabilities at every call
(``card_temperature`` reads and checks it). T > 1 softens over-confident models; the ranking of
the classes, and so the model's label, never changes.

``models/ensemble.json`` (written by ``python -m training train-defaults``/``ensemble``/``calibrate``)
names each member's ONNX sha256 and weight; the weights were chosen under speaker-independent
cross-validation (see that file's ``combination``). Its optional ``"combiner"`` block says how:
``{"method": "mean" | "log-linear", "temperature": T}``: the weighted arithmetic mean of the
(calibrated) probabilities, or their weighted geometric mean renormalised (log-linear pooling),
then the ensemble's own temperature. The card is trusted only when it describes exactly the models
loaded (same ids, same sha256); otherwise, or without a card, the ensemble is the plain mean. A
request for a subset of models re-normalises the weights over that subset, and falls back to equal
weights when the subset's weights are all zero.

Numpy only (the server has no torch). Thread-safety: pure functions; ``EnsembleWeights`` is not
mutated after loading.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CARD = "ensemble.json"
METHODS = ("mean", "log-linear")
_FLOOR = 1e-12  # log of a zero probability


class EnsembleWeights(dict[str, float]):
    """Weights per model id, plus how they combine (``method``) and the ensemble temperature.

    A dict, so callers that only know weights (``app.service.make_emotion``) pass it on unchanged."""

    def __init__(self, weights: Mapping[str, float], method: str = "mean", temperature: float = 1.0):
        super().__init__(weights)
        self.method = method
        self.temperature = temperature


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` over the last axis (probabilities in, probabilities out)."""
    p = np.asarray(probs, np.float64)
    if temperature == 1.0:
        return p / p.sum(axis=-1, keepdims=True)
    z = np.log(np.maximum(p, _FLOOR)) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _temperature(value, where: str) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not np.isfinite(t) or t <= 0:
        log.warning("%s: temperature %r is not a positive number; using 1.0 (uncalibrated)", where, value)
        return 1.0
    return t


def card_temperature(card: Mapping, where: str = "model card") -> float:
    """The temperature of a model card's ``calibration`` block (1.0 = none)."""
    block = card.get("calibration") or {}
    return _temperature(block.get("temperature", 1.0), where) if isinstance(block, Mapping) else 1.0


def load_weights(model_dir: str | Path, shas: Mapping[str, str]) -> dict[str, float] | None:
    """Weights per model id from ``<model_dir>/ensemble.json``, or None (plain mean).

    ``shas`` maps every loaded model id to the sha256 in its card."""
    path = Path(model_dir) / CARD
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        members = raw["members"]
        weights = {str(m["id"]): float(m.get("weight", 1.0)) for m in members}
        combiner = raw.get("combiner") or {}
        method = str(combiner.get("method", "mean"))
        card_shas = {str(m["id"]): str(m.get("sha256", "")) for m in members}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s (%s): the ensemble is the plain mean", path, exc)
        return None
    if set(weights) != set(shas) or any(card_shas[m] != shas[m] for m in shas):
        log.warning(
            "%s describes other models than those loaded (%s): the ensemble is the plain mean",
            path,
            ", ".join(sorted(shas)),
        )
        return None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        log.warning("ignoring %s: weights must be non-negative and not all zero", path)
        return None
    if method not in METHODS:
        log.warning("ignoring %s: combiner method %r not in %s", path, method, METHODS)
        return None
    temperature = _temperature(combiner.get("temperature", 1.0), f"{path} combiner")
    return EnsembleWeights(weights, method, temperature)


def combine(per_model: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None) -> np.ndarray:
    """The ensemble of the probability vectors in ``per_model``: with ``EnsembleWeights`` its method
    and temperature; with plain weights their weighted mean; without weights the plain mean."""
    ids = list(per_model)
    stacked = np.stack([np.asarray(per_model[m], np.float64) for m in ids])
    w = np.array([weights.get(m, 0.0) for m in ids], np.float64) if weights else np.ones(len(ids))
    if w.sum() <= 0:
        w = np.ones(len(ids))
    w = w / w.sum()
    if getattr(weights, "method", "mean") == "log-linear":
        z = np.einsum("m,mc->c", w, np.log(np.maximum(stacked, _FLOOR)))
        mixed = np.exp(z - z.max())
        mixed /= mixed.sum()
    else:
        mixed = np.einsum("m,mc->c", w, stacked)
    return apply_temperature(mixed, float(getattr(weights, "temperature", 1.0)))
