"""Named ASR models (app/analysis/asr_models.py): Whisper base assembled from its two wheels and
checksummed, offered by name, with its own emotion models, and refused against another name's models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from app.analysis import asr_models
from app.analysis.analyzer import AnalyzerSpec, FeatureConfig
from app.analysis.asr import ASRError, Recognizer, bundled_model_path
from app.analysis.audio import decode
from app.inference.engine import Engine, ModelLoadError
from tests.serving_helpers import make_settings

REPO = Path(__file__).resolve().parents[1]
BASE = asr_models.ASR_MODELS["base"]


def test_assemble_joins_the_parts_checks_sha256_and_is_reused(tmp_path):
    target = asr_models.assemble("base", root=tmp_path)
    model_bin = target / "model.bin"
    assert model_bin.stat().st_size == BASE.size
    assert asr_models._sha256(model_bin) == BASE.sha256
    for side in ("config.json", "tokenizer.json", "vocabulary.txt"):
        assert (target / side).is_file()
    assert not list(target.glob(".model.bin.*"))  # no temporary file left behind
    mtime = model_bin.stat().st_mtime_ns
    assert asr_models.assemble("base", root=tmp_path) == target
    assert model_bin.stat().st_mtime_ns == mtime  # found, not rewritten


def test_a_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    wrong = asr_models.AsrModelSpec(**{**BASE.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(asr_models.ASR_MODELS, "base", wrong)
    with pytest.raises(asr_models.AsrModelError, match="sha256"):
        asr_models.assemble("base", root=tmp_path)
    assert not (tmp_path / "base" / "model.bin").exists()
    assert not list((tmp_path / "base").glob(".model.bin.*"))


def test_a_truncated_assembly_is_rebuilt(tmp_path):
    target = asr_models.assemble("base", root=tmp_path)
    with open(target / "model.bin", "r+b") as f:
        f.truncate(1000)
    asr_models.assemble("base", root=tmp_path)
    assert (target / "model.bin").stat().st_size == BASE.size


def test_names_identities_and_unknown_names():
    assert Recognizer.identity_of("base") == "base"
    assert Recognizer.identity_of(asr_models.model_dir("base")) == "base"
    assert Recognizer.identity_of(bundled_model_path()) == "tiny.en" == Recognizer.identity_of("tiny.en")
    base_cfg = AnalyzerSpec(asr_model="base", device="cpu").feature_config()
    assert base_cfg.asr_model == "base" and base_cfg.digest() != FeatureConfig().digest()
    assert AnalyzerSpec(device="cpu").asr_name() == "tiny.en"
    with pytest.raises(ASRError, match="tiny.en, base"):
        Recognizer(model_path="small", device="cpu")


def test_base_transcribes_with_512_d_encoder_frames(fixtures_dir):
    rec = Recognizer("base", device="cpu", cpu_threads=1)
    assert rec.identity == "base" and rec.multilingual and rec.encoder_window == "full"
    tr = rec.transcribe(decode(fixtures_dir / "kids_angry_a01.flac").mono)
    words = "".join(c for c in tr.text.lower() if c.isalpha() or c == " ").split()
    assert words == "kids are talking by the door".split()
    assert tr.encoder_frames.shape[1] == 512 and np.isfinite(tr.encoder_frames).all()
    assert all(0.0 <= w.confidence <= 1.0 for w in tr.words)


def test_emotion_models_dir_per_name(tmp_path):
    assert asr_models.emotion_models_dir(tmp_path, "base") == tmp_path  # no base/ here
    (tmp_path / "base").mkdir()
    assert asr_models.emotion_models_dir(tmp_path, "base") == tmp_path / "base"
    assert asr_models.emotion_models_dir(tmp_path, "tiny.en") == tmp_path
    assert asr_models.emotion_models_dir(tmp_path, "/some/whisper-dir") == tmp_path


def test_server_refuses_models_trained_on_another_asr_model(tmp_path):
    """tiny.en's shipped models, with no base/ beside them, under EMOTION_ASR_MODEL=base."""
    models = tmp_path / "shipped"  # make_settings writes dummy models into tmp_path / "models"
    models.mkdir()
    for f in ("adf.json", "adf.onnx"):
        shutil.copy(REPO / "models" / f, models / f)
    settings = make_settings(tmp_path, model_dir=models, models=["adf"], warmup=False, asr_model="base")

    class BaseAnalyzer:
        config = FeatureConfig.for_parts(asr_model="base")

    with pytest.raises(ModelLoadError, match=r"ASR model 'tiny.en'.*runs ASR model 'base'"):
        Engine(settings, analyzer=BaseAnalyzer())._load()


def test_cli_asr_install_and_list(capsys):
    from app.cli import main

    assert main(["asr", "install", "base"]) == 0
    assert str(asr_models.install_root() / "base") in capsys.readouterr().out
    assert main(["asr", "install", "small"]) == 1
    assert "unknown ASR model 'small'" in capsys.readouterr().err
    assert main(["asr", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny.en" in out and "base" in out
