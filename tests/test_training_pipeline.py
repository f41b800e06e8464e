"""Feature cache and a training smoke test: real RAVDESS clips -> real Analyzer -> cache ->
cross-validation (2 epochs, tiny configs) -> report -> final fit -> ONNX export + parity."""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from training import models as registry  # noqa: E402
from training.cache import CacheStats, FeatureCache, prepare  # noqa: E402
from training.data import LABEL_SETS, load_dataset  # noqa: E402
from training.protocols import speaker_kfold  # noqa: E402

RAVDESS = Path(__file__).parents[1].parent / "shared/data/ravdess-a01-18"
pytestmark = pytest.mark.skipif(not (RAVDESS / "labels.csv").is_file(), reason="RAVDESS subset not present")
CLASSES = LABEL_SETS["4class"]

# ---------------------------------------------------------------- a trivial model (test only)

TRAIN_DEFAULTS = dict(lr=1e-2, weight_decay=0.0, batch_size=4, epochs=2, patience=2)


@dataclass
class TinyConfig:
    variant: str = "tiny"
    hidden: int = 8


class TinyModel(nn.Module):
    """Masked-mean pooled frames33 and words -> Linear; enough to exercise the trainer and export."""

    input_names = ("frames33", "frames33_mask", "words", "words_mask")

    def __init__(self, config: TinyConfig, n_classes: int, stats: dict):
        super().__init__()
        self.config = config
        for name, dim in (("frames33", 33), ("words", 384)):
            mean, std = stats.get(name, (np.zeros(dim, np.float32), np.ones(dim, np.float32)))
            self.register_buffer(f"{name}_mean", torch.tensor(mean))
            self.register_buffer(f"{name}_std", torch.tensor(np.maximum(std, 1e-6)))
        self.proj = nn.Linear(33 + 384, config.hidden)
        self.out = nn.Linear(config.hidden, n_classes)

    @staticmethod
    def _pool(x, mask):
        m = mask.unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, frames, frames_mask, words, words_mask):
        a = self._pool((frames - self.frames33_mean) / self.frames33_std, frames_mask)
        t = self._pool((words - self.words_mean) / self.words_std, words_mask)
        return self.out(torch.relu(self.proj(torch.cat([a, t], -1))))


# small configurations of the real models (only fields the config actually has are used)
SMOKE_OVERRIDES = {
    "tiny-test": {},
    "cmt-awc": dict(
        lstm_hidden=8, n_layers=1, n_heads=2, ffn_dim=16, pool_hidden=8, fc_hidden=8, sa_hidden=4
    ),
    "ca-mser": dict(mfcc_hidden=8, alexnet_widths=(4, 8, 8, 8, 8), d=16),
    "adf": dict(
        sinc_filters=8,
        sinc_kernel=33,
        conv_channels=(8, 8),
        audio_dense=(16, 16),
        text_lstm=8,
        text_filters=4,
        text_dense=(16,),
        fusion_seg=8,
        fusion_dim=16,
        fusion_hidden=16,
        train_chunks=2,
    ),
    "3m-ser": dict(d_model=16, n_heads=2, head_hidden=8),
}
MODEL_CASES = ["tiny-test", *registry.MODEL_IDS]


@pytest.fixture()
def tiny_registered(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "tiny-test", (__name__, "TinyModel", "TinyConfig"))


def _smoke_overrides(model_id: str) -> dict:
    _, cfg_cls = registry.model_classes(model_id)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    return {k: v for k, v in SMOKE_OVERRIDES.get(model_id, {}).items() if k in names}


# ----------------------------------------------------------------------------- shared fixture


def _pick_clips():
    """8 clips: 4 actors x 2, each actor one pair of classes, all four classes present."""
    clips = load_dataset("ravdess", RAVDESS, "4class")
    plan = {
        "actor_01": ("neutral", "happy"),
        "actor_02": ("sad", "angry"),
        "actor_03": ("happy", "sad"),
        "actor_04": ("angry", "neutral"),
    }
    picked = []
    for speaker, labels in plan.items():
        for label in labels:
            picked.append(next(c for c in clips if c.speaker == speaker and c.label == label))
    return picked


class SpyAnalyzer:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.config = inner.config

    def analyze(self, audio):
        self.calls += 1
        return self.inner.analyze(audio)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Runs the real Analyzer once over the 8 clips into a fresh cache."""
    from app.analysis.analyzer import Analyzer

    root = tmp_path_factory.mktemp("cache")
    clips = _pick_clips()
    spy = SpyAnalyzer(Analyzer())
    stats = CacheStats()
    samples = prepare(clips, CLASSES, FeatureCache(root), None, analyzer=spy, progress=False, stats=stats)
    return {"root": root, "clips": clips, "samples": samples, "spy": spy, "stats": stats}


# -------------------------------------------------------------------------------------- cache


def test_cache_fill_then_hit_skips_asr(cached):
    assert cached["spy"].calls == 8 and cached["stats"].misses == 8
    cache = FeatureCache(cached["root"])
    files = sorted(p.name for p in cache.dir.iterdir())
    assert (
        len([f for f in files if f.endswith(".npz")]) == 8
        and len([f for f in files if f.endswith(".json")]) == 8
    )
    assert cache.dir.name == cache.config.digest()

    def no_asr():
        raise AssertionError("a cached run must not build the Analyzer")

    stats = CacheStats()
    again = prepare(
        cached["clips"], CLASSES, cache, ("frames33", "words"), analyzer=no_asr, progress=False, stats=stats
    )
    assert (stats.hits, stats.misses) == (8, 0)
    first = cached["samples"]
    for a, b in zip(first, again, strict=True):
        assert a.key == b.key and set(b.inputs) == {"frames33", "words"}
        np.testing.assert_array_equal(a.inputs["frames33"], b.inputs["frames33"])
        assert a.transcript == b.transcript
    meta = json.loads(cache.paths(first[0].key)[1].read_text())
    words = meta["transcript"]["words"]
    assert meta["transcript"]["text"] and words and {"word", "start", "end", "confidence"} <= set(words[0])
    assert first[0].label == CLASSES.index(first[0].clip.label)
    assert abs(first[0].duration_s - len(first[0].inputs["waveform"]) / 16000) < 1e-9


def test_stats_ignore_segment_padding(cached):
    from training.trainer import compute_stats

    samples = cached["samples"]
    stats = compute_stats(samples, ["mfcc_seg", "frames33", "frames33_mask", "waveform"])
    assert set(stats) == {"mfcc_seg", "frames33"}  # masks and the waveform are not standardised
    real = np.concatenate(
        [s.inputs["mfcc_seg"].reshape(-1, 40)[: s.inputs["frames33"].shape[0]] for s in samples]
    )
    np.testing.assert_allclose(stats["mfcc_seg"][0], real.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        stats["frames33"][1],
        np.concatenate([s.inputs["frames33"] for s in samples]).std(0),
        rtol=1e-3,
        atol=1e-4,
    )


# -------------------------------------------------------------------------------------- smoke


@pytest.mark.parametrize("model_id", MODEL_CASES)
def test_train_cv_export_smoke(model_id, cached, tiny_registered, tmp_path):
    from training.export import export_model
    from training.trainer import cross_validate, load_report, make_settings, train_final

    if model_id != "tiny-test":
        importlib.import_module(registry.REGISTRY[model_id][0])
    overrides = _smoke_overrides(model_id)
    samples, clips = cached["samples"], cached["clips"]
    folds = speaker_kfold(clips, k=2, seed=0, n_val=1)
    # one member: seed ensembles have their own test below
    settings = make_settings(model_id, epochs=2, patience=2, batch_size=4, seed=0, threads=1, members=1)

    res = cross_validate(
        model_id,
        samples,
        CLASSES,
        folds,
        settings,
        overrides,
        "speaker-kfold",
        {"kind": "ravdess"},
        tmp_path / "runs",
    )
    report = load_report(res.report_path)
    assert report["model"] == model_id and report["classes"] == list(CLASSES)
    assert set(report["oof"]) == {c.path for c in clips}
    assert all(abs(sum(v["probabilities"]) - 1) < 1e-4 for v in report["oof"].values())
    assert [h["test_speakers"] for h in report["protocol"]["held_out"]] == [
        list(f.test_speakers) for f in folds
    ]
    m = report["metrics"]
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["balanced_accuracy"] <= 1 and len(m["confusion_matrix"]) == 4
    assert len(report["folds"]) == 2 and all(1 <= f["best_epoch"] <= 2 for f in report["folds"])
    assert (res.report_path.parent / "confusion.png").is_file()

    result, how = train_final(model_id, samples, len(CLASSES), settings, overrides, epochs=1)
    assert how["epochs"] == 1 and result.epochs_run == 1
    card = export_model(
        model_id,
        result.model,
        result.config,
        CLASSES,
        samples,
        tmp_path / "models",
        {"kind": "ravdess"},
        report,
        how,
    )
    assert card["parity"]["max_abs_diff"] < 1e-4
    assert card["inputs"][0]["shape"][0] == "batch" and [i["name"] for i in card["inputs"]] == list(
        result.model.input_names
    )
    assert card["training_data"]["licence"] == "CC BY-NC-SA 4.0"
    assert card["cv_metrics"]["balanced_accuracy"] == m["balanced_accuracy"]
    onnx_path = tmp_path / "models" / card["onnx"]
    import hashlib

    assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == card["sha256"]
    assert (
        json.loads((tmp_path / "models" / f"{model_id}.json").read_text())["feature_config_digest"]
        == card["feature_config_digest"]
    )


def test_seed_ensemble_with_augmentation_trains_and_exports(cached, tmp_path):
    """``members`` trains copies with consecutive seeds (different weights) and exports their mean."""
    from training.export import export_model
    from training.models.layers import SeedEnsemble
    from training.trainer import fit, make_settings, predict_proba

    samples = cached["samples"]
    overrides = _smoke_overrides("3m-ser")
    settings = make_settings("3m-ser", epochs=2, batch_size=4, threads=1, augment=True, members=2)
    result = fit("3m-ser", len(CLASSES), samples[:6], samples[6:], settings, overrides)
    assert isinstance(result.model, SeedEnsemble) and len(result.model.members) == 2
    a, b = (list(m.parameters())[0] for m in result.model.members)
    assert not torch.equal(a, b)
    probs = predict_proba(result.model, samples)
    members = [predict_proba(m, samples) for m in result.model.members]
    assert np.allclose(probs, np.mean(members, axis=0), atol=1e-5)
    card = export_model(
        "3m-ser", result.model, result.config, CLASSES, samples, tmp_path, {"kind": "ravdess"}
    )
    assert card["parity"]["max_abs_diff"] < 1e-4


def test_cv_under_a_test_condition_with_augmentation_and_adf_on_encoder_frames(cached, tmp_path):
    """A second condition of the same clips is predicted per fold and reported beside clean; as a
    train condition its training speakers' clips join training; adf reads Whisper encoder frames
    in place of the waveform and exports with parity."""
    from training.export import export_model
    from training.trainer import cross_validate, make_settings, train_final

    samples, clips = cached["samples"], cached["clips"]
    rng = np.random.default_rng(0)
    noisy = [
        dataclasses.replace(
            s,
            inputs={
                **s.inputs,
                "encoder": s.inputs["encoder"]
                + rng.normal(0, 0.5, s.inputs["encoder"].shape).astype(np.float32),
            },
        )
        for s in samples
    ]
    folds = speaker_kfold(clips, k=2, seed=0, n_val=1)
    settings = make_settings("adf", epochs=2, patience=2, batch_size=4, seed=0, threads=1, members=1)
    overrides = {**_smoke_overrides("adf"), "acoustic": "encoder"}
    res = cross_validate(
        "adf",
        samples,
        CLASSES,
        folds,
        settings,
        overrides,
        "speaker-kfold",
        {"kind": "ravdess"},
        tmp_path / "runs",
        conditions={"call": noisy},
        train_conditions=("call",),
    )
    report = res.report
    assert report["variant"].startswith("encoder") and report["train_conditions"] == ["clean", "call"]
    call = report["conditions"]["call"]
    assert set(call["oof"]) == set(report["oof"]) and 0 <= call["metrics"]["balanced_accuracy"] <= 1
    assert call["oof"] != report["oof"]  # other inputs, other probabilities
    assert "ece" in report["metrics"] and "ece" in call["metrics"]
    with pytest.raises(ValueError):
        cross_validate("adf", samples, CLASSES, folds, settings, overrides, conditions={"call": noisy[:-1]})
    result, how = train_final("adf", samples + noisy, len(CLASSES), settings, overrides, epochs=1)
    card = export_model(
        "adf", result.model, result.config, CLASSES, samples, tmp_path / "models", {}, report, how
    )
    assert [i["name"] for i in card["inputs"]][:2] == ["encoder", "encoder_mask"]
    assert card["parity"]["max_abs_diff"] < 1e-4
