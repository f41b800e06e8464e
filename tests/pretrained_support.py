"""Helpers for the pretrained-part tests (tests/test_speech_encoder.py, tests/test_word_vectors.py):
4 RAVDESS clips as a manifest, ASR run once per clip for the whole session, the training CLI on
those clips, and an engine that builds its Analyzer from settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path

import numpy as np

RAVDESS = Path(__file__).resolve().parents[2] / "shared/data/ravdess-a01-18"
CLASSES = ("neutral", "happy", "sad", "angry")
# 4 actors x 1 clip, one per class: two speaker folds of 2 test actors, 1 validation actor and
# 1 training actor each (a smoke test of the wiring, not of learning)
PLAN = {"actor_01": "neutral", "actor_02": "sad", "actor_03": "happy", "actor_04": "angry"}


class MemoRecognizer:
    """Wraps a Recognizer: each distinct audio is transcribed once per session (tests only). Every
    other attribute (identity, compute type, window...) is the wrapped recognizer's."""

    def __init__(self, inner):
        self.inner, self._memo, self._lock = inner, {}, threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def transcribe_batch(self, audios, timed=None):
        return [self.transcribe(a) for a in audios]

    def transcribe(self, audio: np.ndarray):
        key = hashlib.sha256(np.ascontiguousarray(audio, np.float32).tobytes()).hexdigest()
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        result = self.inner.transcribe(audio)
        with self._lock:
            self._memo[key] = result
        return result


_memo: dict[int, MemoRecognizer] = {}


def memo_recognizer(analyzer) -> MemoRecognizer:
    return _memo.setdefault(id(analyzer.recognizer), MemoRecognizer(analyzer.recognizer))


def write_manifest(tmp: Path) -> Path:
    """manifest.csv (absolute paths) of the clips of ``PLAN``."""
    from training.data import load_dataset

    clips = load_dataset("ravdess", RAVDESS, "4class")
    rows = ["path,label,speaker"]
    for speaker, label in PLAN.items():
        clip = next(c for c in clips if c.speaker == speaker and c.label == label)
        rows.append(f"{clip.path},{label},{speaker}")
    path = Path(tmp) / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def fill_cache(manifest: Path, cache_root: Path, analyzer) -> str:
    """Analyse the manifest's clips into ``cache_root`` with ``analyzer``; returns the digest."""
    from training.cache import FeatureCache, prepare, utterance_clips
    from training.data import load_dataset

    cache = FeatureCache(cache_root, analyzer.config)
    clips, _ = utterance_clips(load_dataset("manifest", manifest), analyzer.config, cache_root)
    prepare(clips, CLASSES, cache, (), analyzer=analyzer, progress=False)
    return cache.digest


def train_cli(model_id: str, manifest: Path, tmp: Path, sets: dict, extra: list[str]) -> tuple[dict, dict]:
    """``python -m training train`` (2 speaker folds, 1 epoch, export) -> (card, CV report)."""
    from training.__main__ import main

    argv = [
        "train",
        "--model",
        model_id,
        "--dataset",
        "manifest",
        "--data",
        str(manifest),
        "--cache-dir",
        str(tmp / "cache"),
        "--folds",
        "2",
        "--val-speakers",
        "1",
        "--epochs",
        "1",
        "--patience",
        "1",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp / "runs"),
        "--models-dir",
        str(tmp / "trained"),
        "--no-progress",
        *extra,
    ]
    for key, value in sets.items():
        argv += ["--set", f"{key}={json.dumps(value) if isinstance(value, (list, tuple)) else value}"]
    assert main(argv) == 0
    card = json.loads((tmp / "trained" / f"{model_id}.json").read_text())
    (report_path,) = (tmp / "runs").glob(f"{model_id}-*/report.json")
    return card, json.loads(report_path.read_text())


def serve_once(settings, analyzer, monkeypatch) -> tuple[object, np.ndarray]:
    """Start an Engine whose Analyzer comes from ``Analyzer.from_settings(settings)`` (the
    recognizer that ``AnalyzerSpec.build`` constructs replaced by the session's memoised one), warm it up (ASR + every model on a real analysis) and
    run one utterance through its first model; returns (the engine's analyzer config, probabilities)."""
    from app.analysis.asr import Recognizer
    from app.analysis.audio import decode
    from app.analysis.inputs import model_inputs
    from app.inference.engine import Engine

    memo = memo_recognizer(analyzer)

    def recognizer(*args, **kwargs):  # what AnalyzerSpec.build constructs
        return memo

    recognizer.identity_of = Recognizer.identity_of
    monkeypatch.setattr("app.analysis.asr.Recognizer", recognizer)

    async def main():
        engine = Engine(settings)
        await engine.start()
        try:
            audio = decode(Path(__file__).parent / "fixtures" / "angry_kids.flac").mono
            analysis = await engine.analyze(audio)
            inputs = model_inputs(analysis, max_words=engine.analyzer.config.max_words)
            probs = await engine.infer(settings.models[0], inputs)
            return engine.analyzer.config, probs
        finally:
            await engine.stop()

    return asyncio.run(main())


def assert_served_only_with(
    tmp: Path, analyzer, monkeypatch, model_id: str, part: dict, digest: str, refusal: str
):
    """The model exported to ``tmp/trained`` is served by a server configured with ``part`` (one
    ``Settings`` field -> value), computing ``digest``, and refused by a server without it, with an
    error that names ``refusal``."""
    import pytest

    from app.analysis.analyzer import FeatureConfig
    from app.inference.engine import Engine, ModelLoadError
    from tests.serving_helpers import make_settings

    settings = make_settings(tmp, model_dir=tmp / "trained", models=[model_id], warmup=True, **part)
    config, probs = serve_once(settings, analyzer, monkeypatch)
    assert config.digest() == digest and probs.shape == (4,) and abs(float(probs.sum()) - 1) < 1e-4

    default = make_settings(tmp, model_dir=tmp / "trained", models=[model_id], warmup=False)
    engine = Engine(default, analyzer=type("A", (), {"config": FeatureConfig.from_settings(default)})())
    with pytest.raises(ModelLoadError, match=refusal):
        engine._load()
