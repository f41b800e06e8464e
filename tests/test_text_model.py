"""A local text encoder (e.g. BERT, paper 000/004's choice) and a local ASR model in place of the
bundled MiniLM and tiny.en: both change the feature digest, so a model is served only with the parts
it was trained on.

A tiny random-init ``BertModel`` (32-d, 1 layer, MiniLM's vocabulary) is saved with
``save_pretrained`` and exported once per module by ``training/text_encoder_export.py``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from app.analysis.analyzer import Analyzer, AnalyzerSpec, FeatureConfig  # noqa: E402
from app.analysis.asr import ASRError, Recognizer, bundled_model_path  # noqa: E402
from app.analysis.text import TextEncoder  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests import pretrained_support as S  # noqa: E402

HIDDEN = 32
# the default parts' digest: the shipped models in models/ carry it (tests/test_golden.py serves them)
DEFAULT_DIGEST = "e5fa9553902d4820"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """Exported directory of a tiny BERT with MiniLM's tokenizer."""
    from training.text_encoder_export import default_model_dir, export

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    src = root / "bert-tiny"
    transformers.BertModel(config).save_pretrained(src)
    shutil.copy(default_model_dir() / "tokenizer.json", src / "tokenizer.json")
    export(src, root / "bert-onnx", quantize=False)
    return root / "bert-onnx"


def test_local_text_encoder_changes_the_digest_and_the_word_width(bert, analyzer, fixtures_dir):
    from app.analysis.audio import decode

    enc = TextEncoder(bert)
    assert enc.dim == HIDDEN and enc.identity == TextEncoder.identity_of(bert)
    assert enc.identity.startswith("bert-onnx:")
    assert TextEncoder.identity_of(None) == TextEncoder().identity == FeatureConfig().text_model

    cfg = FeatureConfig.for_parts(text_model=bert)
    assert cfg.text_model == enc.identity and cfg.digest() != DEFAULT_DIGEST
    assert FeatureConfig.from_settings(Settings(text_model=str(bert))) == cfg
    assert FeatureConfig.from_settings(Settings()).digest() == DEFAULT_DIGEST

    rec = S.memo_recognizer(analyzer)
    custom = Analyzer(rec, enc)
    assert custom.config == cfg
    analysis = custom.analyze(decode(fixtures_dir / "angry_kids.flac").mono)
    assert analysis.text.contextual.shape == (len(analysis.text), HIDDEN)
    assert np.isfinite(analysis.text.contextual).all()
    with pytest.raises(ValueError, match="feature config"):
        Analyzer(rec, enc, config=FeatureConfig())


def test_local_asr_model_changes_the_digest(tmp_path):
    bundled = bundled_model_path()
    assert Recognizer.identity_of(None) == Recognizer.identity_of(bundled) == FeatureConfig().asr_model
    # the same files under another directory: a local model, named by its directory and content
    copy = tmp_path / "whisper-copy"
    copy.mkdir()
    for f in bundled.iterdir():
        if f.is_file():
            (copy / f.name).symlink_to(f)
    identity = Recognizer.identity_of(copy)
    assert identity.startswith("whisper-copy:")
    cfg = FeatureConfig.for_parts(asr_model=copy)
    assert cfg.asr_model == identity and cfg.digest() != DEFAULT_DIGEST
    assert FeatureConfig.from_settings(Settings(asr_model=str(copy))) == cfg
    # the server's path: the recognizer built from the same settings names itself the same way
    spec = AnalyzerSpec.from_settings(Settings(asr_model=str(copy)), device="cpu", cpu_threads=1)
    assert spec.build().recognizer.identity == identity
    with pytest.raises(ASRError, match="model.bin"):
        Recognizer.identity_of(tmp_path)


@pytest.mark.skipif(not (S.RAVDESS / "labels.csv").is_file(), reason="RAVDESS subset not present")
def test_3m_ser_trains_with_the_local_text_encoder_and_is_served_only_with_it(
    bert, analyzer, tmp_path, monkeypatch
):
    from training import __main__ as cli

    manifest = S.write_manifest(tmp_path)
    digest = S.fill_cache(
        manifest, tmp_path / "cache", Analyzer(S.memo_recognizer(analyzer), TextEncoder(bert))
    )

    def no_analysis(self):
        raise AssertionError("the CLI must find every clip in the cache filled with the same text encoder")

    monkeypatch.setattr(cli.Context, "analyzer", no_analysis)
    tiny = dict(d_model=16, head_hidden=8)
    card, report = S.train_cli(
        "3m-ser", manifest, tmp_path, tiny, ["--text-model", str(bert), "--members", "1"]
    )
    assert card["feature_config_digest"] == report["feature_config_digest"] == digest != DEFAULT_DIGEST
    assert card["feature_config"]["text_model"] == TextEncoder.identity_of(bert)
    assert card["config"]["text_dim"] == HIDDEN  # the model's width follows the data (384 by default)
    spec = {i["name"]: i["shape"] for i in card["inputs"]}
    assert spec["words"] == ["batch", "words", HIDDEN]

    # served when the server is configured with the same part, refused (naming it) without it
    S.assert_served_only_with(
        tmp_path, analyzer, monkeypatch, "3m-ser", {"text_model": str(bert)}, digest, "text_model=bert-onnx"
    )
