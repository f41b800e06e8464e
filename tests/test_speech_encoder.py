"""wav2vec2 frames from a local HuggingFace directory (training/speech_encoder_export.py ->
app.analysis.speech_encoder): ca-mser's paper-faithful enc_seg.

A tiny random-init ``Wav2Vec2Model`` (32-d, 2 layers) is saved with ``save_pretrained`` and exported
once per module: parity with torch, frames per 3-s segment, normalisation, the analyzer and model
inputs, the feature digest, a training run of ca-mser through the CLI, and serving the trained model.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from app.analysis.analyzer import Analyzer, FeatureConfig  # noqa: E402
from app.analysis.speech_encoder import SpeechEncoder  # noqa: E402
from tests import pretrained_support as S  # noqa: E402

HIDDEN = 32


@pytest.fixture(scope="module")
def w2v(tmp_path_factory):
    """(HF source dir, exported dir, parity difference) of a tiny wav2vec2 with do_normalize."""
    from training.speech_encoder_export import export

    root = tmp_path_factory.mktemp("w2v")
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    transformers.Wav2Vec2Model(config).save_pretrained(root / "wav2vec2-tiny")
    prep = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "sampling_rate": 16000,
        "do_normalize": True,
    }
    (root / "wav2vec2-tiny" / "preprocessor_config.json").write_text(json.dumps(prep))
    _, diff = export(root / "wav2vec2-tiny", root / "w2v-onnx")
    return root / "wav2vec2-tiny", root / "w2v-onnx", diff


def _torch_frames(src, segments: np.ndarray) -> np.ndarray:
    model = transformers.AutoModel.from_pretrained(str(src), local_files_only=True).eval()
    with torch.no_grad():
        return model(input_values=torch.from_numpy(segments)).last_hidden_state.numpy()


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (
        0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.normal(size=t.size)
    ).astype(np.float32)


def test_export_parity_and_frames_per_segment(w2v):
    src, out, diff = w2v
    assert diff < 1e-3 and {p.name for p in out.iterdir()} >= {
        "model.onnx",
        "config.json",
        "preprocessor_config.json",
    }
    enc = SpeechEncoder(out)
    assert enc.dim == HIDDEN and enc.do_normalize

    audio = _speechlike(4.5)  # one full 3-s segment and a 1.5-s one, zero-padded
    frames = enc.segment_frames(audio)
    assert frames.shape == (2, 150, HIDDEN) and frames.dtype == np.float32

    # torch on the same segments: each normalised over its real samples, then zero-padded
    segs = np.zeros((2, 48000), np.float32)
    for i, piece in enumerate((audio[:48000], audio[48000:])):
        segs[i, : len(piece)] = (piece - piece.mean()) / np.sqrt(piece.var() + 1e-7)
    ref = _torch_frames(src, segs)
    assert ref.shape == (2, 149, HIDDEN)  # 149 wav2vec2 frames per 3 s, as in the paper
    np.testing.assert_allclose(frames[0, :149], ref[0], atol=1e-4)
    real = math.ceil(24000 / 320)  # frames that start inside the last segment's audio
    np.testing.assert_allclose(frames[1, :real], ref[1, :real], atol=1e-4)
    assert not frames[0, 149:].any() and not frames[1, real:].any()  # padding frames are zero
    assert (np.abs(frames[0, :149]).sum(-1) > 0).all() and (np.abs(frames[1, :real]).sum(-1) > 0).all()

    short = enc.segment_frames(audio[:8000])
    assert short.shape == (1, 150, HIDDEN) and (np.abs(short[0]).sum(-1) > 0).sum() == 25


def test_normalisation_follows_the_preprocessor_config(w2v, tmp_path):
    _, out, _ = w2v
    audio = _speechlike(2.0, seed=1)  # zero-padded to 3 s
    shifted = 5 * audio + 0.5
    enc = SpeechEncoder(out)
    np.testing.assert_allclose(enc.segment_frames(audio), enc.segment_frames(shifted), atol=1e-4)

    raw_dir = tmp_path / "w2v-raw"
    shutil.copytree(out, raw_dir)
    prep = json.loads((raw_dir / "preprocessor_config.json").read_text())
    (raw_dir / "preprocessor_config.json").write_text(json.dumps({**prep, "do_normalize": False}))
    raw = SpeechEncoder(raw_dir)
    assert not raw.do_normalize and raw.identity != enc.identity  # the digest sees the setting
    # without normalisation the offset survives into the padded segment (GroupNorm alone would
    # hide a pure gain change, not the step to the zero padding)
    assert not np.allclose(raw.segment_frames(audio), raw.segment_frames(shifted), atol=1e-2)


def test_analyzer_puts_wav2vec2_frames_in_enc_seg(w2v, analyzer, fixtures_dir):
    from app.analysis.audio import decode
    from app.analysis.inputs import model_inputs
    from app.settings import Settings

    _, out, _ = w2v
    enc = SpeechEncoder(out)
    rec = S.memo_recognizer(analyzer)
    with_w2v = Analyzer(rec, analyzer.text_encoder, speech_encoder=enc)
    plain = Analyzer(rec, analyzer.text_encoder)
    audio = decode(fixtures_dir / "kids_angry_a01.flac").mono

    a = with_w2v.analyze(audio)
    x, y = model_inputs(a), model_inputs(plain.analyze(audio))
    n_seg = math.ceil(len(audio) / 48000)
    assert x["enc_seg"].shape == (n_seg, 150, HIDDEN) and y["enc_seg"].shape == (n_seg, 150, 384)
    np.testing.assert_array_equal(x["enc_seg"], enc.segment_frames(audio))
    assert x["seg_mask"].shape == (n_seg,) and "speech_encoder" in a.timing_ms
    for name in set(x) - {"enc_seg"}:  # Whisper frames still feed 3m-ser and the baseline
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)

    cfg = with_w2v.config
    assert cfg.speech_encoder == enc.identity and enc.identity.startswith("w2v-onnx:")
    assert cfg.digest() != FeatureConfig().digest() == "e5fa9553902d4820"
    assert FeatureConfig.for_parts(speech_encoder=out) == cfg
    assert FeatureConfig.from_settings(Settings(speech_encoder=str(out))) == cfg
    with pytest.raises(ValueError, match="feature config"):
        Analyzer(rec, analyzer.text_encoder, config=FeatureConfig(), speech_encoder=enc)


@pytest.mark.skipif(not (S.RAVDESS / "labels.csv").is_file(), reason="RAVDESS subset not present")
def test_ca_mser_trains_with_wav2vec2_and_is_served_only_with_it(w2v, analyzer, tmp_path, monkeypatch):
    from training import __main__ as cli

    _, out, _ = w2v
    manifest = S.write_manifest(tmp_path)
    filler = Analyzer(S.memo_recognizer(analyzer), analyzer.text_encoder, speech_encoder=SpeechEncoder(out))
    digest = S.fill_cache(manifest, tmp_path / "cache", filler)

    def no_analysis(self):
        raise AssertionError("the CLI must find every clip in the cache filled with the same encoder")

    monkeypatch.setattr(cli.Context, "analyzer", no_analysis)
    tiny = dict(mfcc_hidden=8, alexnet_widths=[4, 8, 8, 8, 8], d=16)
    card, report = S.train_cli("ca-mser", manifest, tmp_path, tiny, ["--speech-encoder", str(out)])
    assert (
        card["feature_config_digest"] == report["feature_config_digest"] == digest != FeatureConfig().digest()
    )
    assert card["feature_config"]["speech_encoder"] == SpeechEncoder.identity_of(out)
    assert card["config"]["enc_dim"] == HIDDEN  # the model's width follows the data (384 by default)
    spec = {i["name"]: i["shape"] for i in card["inputs"]}
    assert spec["enc_seg"] == ["batch", "segments", 150, HIDDEN]

    # served when the server is configured with the same part, refused (naming it) without it
    S.assert_served_only_with(
        tmp_path,
        analyzer,
        monkeypatch,
        "ca-mser",
        {"speech_encoder": str(out)},
        digest,
        "speech_encoder=w2v-onnx",
    )
