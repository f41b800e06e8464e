"""Calibration: ECE on constructed cases, temperature recovery, and the server applying it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from app.inference.ensemble import (
    EnsembleWeights,
    apply_temperature,
    card_temperature,
    combine,
    load_weights,
)
from training.calibration import ece, fit_temperature, out_of_fold_temperature


def test_ece_of_constructed_cases():
    # 10 predictions at confidence 0.8, 8 right: perfectly calibrated
    probs = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert ece(probs, y) == pytest.approx(0.0)
    # the same confidence, all right: the gap is 0.2
    assert ece(probs, np.zeros(10, int)) == pytest.approx(0.2)
    # two bins: 4 at 0.95 (all right, gap 0.05) and 6 at 0.55 (3 right, gap 0.05) -> 0.05
    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 6)
    y = np.array([0] * 4 + [0, 0, 0, 1, 1, 1])
    assert ece(probs, y) == pytest.approx(0.05)
    # confidence exactly on a bin edge (2/3 = 10/15) goes to the lower bin, 1.0 to the last
    assert ece(np.array([[2 / 3, 1 / 3], [1.0, 0.0]]), np.array([0, 1])) == pytest.approx(
        0.5 * (1 - 2 / 3) + 0.5 * 1.0
    )


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    n, k, t_true = 6000, 4, 2.5
    logits = rng.normal(0, 3.0, (n, k))
    # labels drawn from the calibrated distribution softmax(logits); the model reports logits * T
    p_true = np.exp(logits - logits.max(1, keepdims=True))
    p_true /= p_true.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in p_true])
    overconfident = apply_temperature(p_true, 1 / t_true)
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(t_true, rel=0.08)
    assert ece(apply_temperature(overconfident, t), y) < 0.5 * ece(overconfident, y)
    # temperature never changes the label
    assert np.array_equal(apply_temperature(overconfident, t).argmax(1), overconfident.argmax(1))


def test_out_of_fold_temperature_never_uses_the_folds_own_labels():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4) * 0.3, 300)
    y = np.array([rng.choice(4, p=apply_temperature(p, 2.0)) for p in probs])  # over-confident model
    fold = np.repeat(np.arange(3), 100)
    calibrated, per_fold, t_all = out_of_fold_temperature(probs, y, fold)
    y2 = y.copy()
    y2[fold == 0] = (y2[fold == 0] + 1) % 4  # change fold 0's labels only
    calibrated2, per_fold2, _ = out_of_fold_temperature(probs, y2, fold)
    assert np.allclose(calibrated[fold == 0], calibrated2[fold == 0])
    assert per_fold[0] == per_fold2[0] and per_fold[1] != per_fold2[1]
    assert t_all > 0


def test_card_temperature_and_combiner_card(tmp_path):
    assert card_temperature({}) == 1.0
    assert card_temperature({"calibration": {"temperature": 1.7}}) == 1.7
    assert card_temperature({"calibration": {"temperature": -2}}) == 1.0
    assert card_temperature({"calibration": {"temperature": "x"}}) == 1.0
    shas = {"a": "1" * 64, "b": "2" * 64}
    card = {
        "members": [
            {"id": "a", "sha256": shas["a"], "weight": 0.5},
            {"id": "b", "sha256": shas["b"], "weight": 0.5},
        ],
        "combiner": {"method": "log-linear", "temperature": 2.0},
    }
    (tmp_path / "ensemble.json").write_text(json.dumps(card))
    w = load_weights(tmp_path, shas)
    assert isinstance(w, EnsembleWeights) and w == {"a": 0.5, "b": 0.5}
    assert (w.method, w.temperature) == ("log-linear", 2.0)
    pa, pb = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.8, 0.1])
    geo = np.sqrt(pa * pb) / np.sqrt(pa * pb).sum()
    assert combine({"a": pa, "b": pb}, w) == pytest.approx(apply_temperature(geo, 2.0))
    assert combine({"a": pa, "b": pb}, EnsembleWeights({"a": 1, "b": 1})) == pytest.approx((pa + pb) / 2)
    card["combiner"]["method"] = "median"
    (tmp_path / "ensemble.json").write_text(json.dumps(card))
    assert load_weights(tmp_path, shas) is None  # unknown method: plain mean


def test_the_server_applies_the_card_temperature(tmp_path):
    """A shipped model with ``calibration.temperature`` in its card gives softened probabilities
    through the engine's ModelRunner; the label stays."""
    from pathlib import Path

    from app.inference.engine import ModelCard, ModelRunner

    models = Path(__file__).resolve().parents[1] / "models"
    raw = json.loads((models / "3m-ser.json").read_text())
    shutil.copy(models / raw["onnx"], tmp_path / raw["onnx"])
    classes = tuple(raw["classes"])
    rng = np.random.default_rng(0)
    sample = {
        "enc_patches": rng.normal(0, 1, (3, 384)).astype(np.float32),
        "patch_mask": np.ones(3, np.float32),
    }
    sample |= {"words": rng.normal(0, 0.1, (5, 384)).astype(np.float32), "words_mask": np.ones(5, np.float32)}

    def run(temperature):
        card = dict(raw, calibration={"temperature": temperature})
        (tmp_path / "3m-ser.json").write_text(json.dumps(card))
        runner = ModelRunner(ModelCard.load(tmp_path, "3m-ser"), ["CPUExecutionProvider"], 1, classes)
        return runner.run([sample])[0]

    plain, soft = run(1.0), run(3.0)
    assert soft == pytest.approx(apply_temperature(plain, 3.0), abs=1e-6)
    assert soft.max() < plain.max() and soft.argmax() == plain.argmax()
