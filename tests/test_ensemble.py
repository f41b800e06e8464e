"""The served ensemble (app/inference/ensemble.py) and the cross-validated weights that feed it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.inference.ensemble import combine, load_weights
from app.service import make_emotion

CLASSES = ("neutral", "happy", "sad", "angry")
SHAS = {"a": "1" * 64, "b": "2" * 64}


def _card(tmp_path, members):
    (tmp_path / "ensemble.json").write_text(json.dumps({"id": "ensemble", "members": members}))


def test_weights_load_only_for_exactly_the_loaded_models(tmp_path):
    assert load_weights(tmp_path, SHAS) is None  # no card: plain mean
    _card(
        tmp_path,
        [{"id": "a", "sha256": SHAS["a"], "weight": 0.3}, {"id": "b", "sha256": SHAS["b"], "weight": 0.7}],
    )
    assert load_weights(tmp_path, SHAS) == {"a": 0.3, "b": 0.7}
    assert load_weights(tmp_path, {"a": SHAS["a"]}) is None  # other model set
    assert load_weights(tmp_path, {"a": SHAS["a"], "b": "3" * 64}) is None  # retrained member
    _card(tmp_path, [{"id": "a", "sha256": SHAS["a"], "weight": -1}, {"id": "b", "sha256": SHAS["b"]}])
    assert load_weights(tmp_path, SHAS) is None
    (tmp_path / "ensemble.json").write_text("{not json")
    assert load_weights(tmp_path, SHAS) is None


def test_combine_weights_and_subsets():
    p = {"a": np.array([1.0, 0, 0, 0]), "b": np.array([0, 1.0, 0, 0]), "c": np.array([0, 0, 1.0, 0])}
    assert combine(p) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    w = {"a": 0.2, "b": 0.6, "c": 0.2}
    assert combine(p, w) == pytest.approx([0.2, 0.6, 0.2, 0])
    assert combine({"a": p["a"], "c": p["c"]}, w) == pytest.approx([0.5, 0, 0.5, 0])  # re-normalised
    assert combine({"a": p["a"], "c": p["c"]}, {"a": 0.0, "b": 1.0, "c": 0.0}) == pytest.approx(
        [0.5, 0, 0.5, 0]
    )  # all-zero subset: plain mean


def test_make_emotion_uses_the_weights_for_the_top_level():
    per_model = {"a": np.array([0.6, 0.4, 0, 0]), "b": np.array([0.0, 0.9, 0.1, 0])}
    plain = make_emotion(CLASSES, per_model)
    weighted = make_emotion(CLASSES, per_model, {"a": 0.9, "b": 0.1})
    assert plain.label == "happy" and weighted.label == "neutral"
    assert weighted.probabilities["neutral"] == pytest.approx(0.54) == weighted.score
    assert [r.label for r in weighted.ranking] == ["neutral", "happy", "sad", "angry"]
    assert set(weighted.per_model) == {"a", "b"}  # the ensemble is the top level, not an entry
    assert weighted.per_model["b"].label == "happy" and weighted.per_model["b"].score == pytest.approx(0.9)


def _run_report(model, probs, y, fold):
    """A member's run report as the trainer writes it (only the fields the ensemble reads)."""
    classes = list(CLASSES)
    oof = {
        f"c{i}": {
            "label": classes[y[i]],
            "speaker": f"s{fold[i]}",
            "fold": int(fold[i]),
            "probabilities": probs[i].tolist(),
        }
        for i in range(len(y))
    }
    pred = probs.argmax(1)
    recalls = [float((pred[y == c] == c).mean()) for c in range(len(classes))]
    return {
        "model": model,
        "variant": "v",
        "classes": classes,
        "oof": oof,
        "feature_config": {},
        "feature_config_digest": "d1",
        "dataset": {"kind": "manifest", "labels": "4class", "n_clips": len(y), "n_speakers": 3},
        "protocol": {
            "name": "speaker-kfold",
            "n_folds": 3,
            "seed": 0,
            "held_out": [{"fold": f, "test_speakers": [f"s{f}"]} for f in range(3)],
        },
        "metrics": {
            "n": len(y),
            "accuracy": float((pred == y).mean()),
            "balanced_accuracy": float(np.mean(recalls)),
        },
        "train_seconds": 60.0,
    }


def test_cross_validated_weights_never_use_the_test_folds_labels(tmp_path):
    from training.trainer import best_weights, ensemble_reports

    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 4, n)
    good = np.eye(4)[y] * 0.6 + 0.1  # member 0 is right
    noise = rng.dirichlet(np.ones(4), n)  # member 1 is noise
    fold = np.arange(n) % 3

    w = best_weights(np.stack([good, noise]), y, 4)
    assert w[0] > w[1]
    members = [_run_report("good", good, y, fold), _run_report("noise", noise, y, fold)]
    res = ensemble_reports(members, tmp_path, combine="weighted")
    cfg = res.report["config"]
    assert cfg["weights"][0] > cfg["weights"][1] and set(cfg["fold_weights"]) == {0, 1, 2}
    assert res.report["metrics"]["balanced_accuracy"] == pytest.approx(1.0)


def test_publish_writes_card_and_results_only_for_the_exported_runs(tmp_path):
    from training.__main__ import publish_results
    from training.trainer import ensemble_reports

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 60)
    fold = np.arange(60) % 3
    members = [
        _run_report("a", np.eye(4)[y] * 0.6 + 0.1, y, fold),
        _run_report("b", rng.dirichlet(np.ones(4), 60), y, fold),
    ]
    models = tmp_path / "models"
    models.mkdir()
    for r in members:
        card = {
            "id": r["model"],
            "variant": "v",
            "onnx": f"{r['model']}.onnx",
            "sha256": r["model"] * 8,
            "feature_config_digest": "d1",
            "training_data": {},
            "training": {"seconds": 30.0},
            "cv_metrics": dict(r["metrics"]),
        }
        (models / f"{r['model']}.json").write_text(json.dumps(card))
    ens = ensemble_reports(members, tmp_path / "runs", combine="weighted").report

    publish_results(models, [], members, ens)
    card = json.loads((models / "ensemble.json").read_text())
    assert [(m["id"], m["sha256"]) for m in card["members"]] == [("a", "a" * 8), ("b", "b" * 8)]
    assert [m["weight"] for m in card["members"]] == ens["config"]["weights"]
    table = (models / "RESULTS.md").read_text()
    assert "| a | v |" in table and "| ensemble | weighted-a+b |" in table
    assert "| 1.5 |" in table  # CV minutes + the card's final-fit seconds

    # a card exported from another run (other CV metrics) is refused, and nothing is rewritten
    stale = json.loads((models / "b.json").read_text())
    stale["cv_metrics"]["balanced_accuracy"] = 0.123
    (models / "b.json").write_text(json.dumps(stale))
    (models / "ensemble.json").unlink()
    with pytest.raises(SystemExit, match="not exported from run"):
        publish_results(models, [], members, ens)
    assert not (models / "ensemble.json").exists()


def _with_call(report, call_probs, y, fold):
    """Add a call-audio condition block as ``cross_validate(..., conditions=...)`` writes it."""
    call = _run_report(report["model"], call_probs, y, fold)
    report["conditions"] = {"call": {"metrics": call["metrics"], "oof": call["oof"]}}
    report["train_conditions"] = ["clean"]
    return report


def test_combiners_are_scored_per_condition_and_chosen_by_the_worst_one():
    """Member a is right on clean clips and noise on call audio; member b the reverse. Weights fitted
    on clean predictions alone (the old rule) favour a and fail on call audio; the chosen combiner
    must be the one whose worst condition is best, and fitted weights stay >= 0.15 where constrained."""
    from training.combine import MIN_WEIGHT, analyse

    rng = np.random.default_rng(2)
    n = 240
    y = rng.integers(0, 4, n)
    fold = np.arange(n) % 4
    right = lambda: np.eye(4)[y] * 0.5 + rng.dirichlet(np.ones(4), n) * 0.5  # noqa: E731
    noise = lambda: rng.dirichlet(np.ones(4), n)  # noqa: E731
    a = _with_call(_run_report("a", right(), y, fold), noise(), y, fold)
    b = _with_call(_run_report("b", noise() * 0.6 + np.eye(4)[y] * 0.4, y, fold), right(), y, fold)
    out = analyse([a, b], ["clean", "call"])
    combos = out["combiners"]
    assert combos["weighted"]["weights"][0] > combos["weighted"]["weights"][1]
    assert combos["weighted"]["call"]["balanced_accuracy"] < combos["mean"]["call"]["balanced_accuracy"]
    assert min(combos["constrained"]["weights"]) >= MIN_WEIGHT - 1e-9
    worst = {k: v["worst_balanced_accuracy"] for k, v in combos.items()}
    assert worst[out["chosen"]] >= max(worst.values()) - 0.01
    for m in out["members"]:
        assert m["temperature"] > 0 and set(m["fold_temperatures"]) == {0, 1, 2, 3}
    assert out["ensemble"]["temperature"] > 0 and 0 <= out["ensemble"]["call"]["ece"] <= 1
