"""How the server combines the models' probabilities into the ``ensemble`` entry.

``models/ensemble.json`` (written by ``python -m training train-defaults``/``ensemble``) names
each member's ONNX sha256 and weight; the weights were chosen under speaker-independent
cross-validation (see that file's ``combination``). The card is trusted only when it describes
exactly the models loaded (same ids, same sha256); otherwise, or without a card, the ensemble is
the plain mean. A request for a subset of models re-normalises the weights over that subset, and
falls back to the plain mean when the subset's weights are all zero.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CARD = "ensemble.json"


def load_weights(model_dir: str | Path, shas: Mapping[str, str]) -> dict[str, float] | None:
    """Weights per model id from ``<model_dir>/ensemble.json``, or None (plain mean).

    ``shas`` maps every loaded model id to the sha256 in its card."""
    path = Path(model_dir) / CARD
    if not path.is_file():
        return None
    try:
        members = json.loads(path.read_text())["members"]
        weights = {str(m["id"]): float(m.get("weight", 1.0)) for m in members}
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
    return weights


def combine(per_model: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Weighted mean of the probability vectors in ``per_model`` (plain mean without weights)."""
    ids = list(per_model)
    stacked = np.stack([np.asarray(per_model[m], np.float64) for m in ids])
    w = np.array([weights.get(m, 0.0) for m in ids], np.float64) if weights else np.ones(len(ids))
    if w.sum() <= 0:
        w = np.ones(len(ids))
    return np.einsum("m,mc->c", w / w.sum(), stacked)
