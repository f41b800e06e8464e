"""CA-MSER and ADF: every variant's shapes, padding invariance, finiteness and ONNX Runtime parity.

Tiny layer sizes keep this fast on 2 CPU cores; the input shapes are the real ones (300 x 200
spectrogram images, 16-kHz waveforms), since the AlexNet stack and the sliding SincNet depend on them.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.analysis.features import waveform_chunks
from app.analysis.inputs import collate
from training.models import build_model
from training.models.adf import Adf, AdfConfig
from training.models.ca_mser import AlexNetFeatures, CaMser, CaMserConfig, adaptive_avg_matrix

N_CLASSES = 4
ENC = 384
TINY_CAMSER = dict(mfcc_hidden=8, alexnet_widths=(4, 8, 8, 8, 8), d=16)
TINY_ADF = dict(
    sinc_filters=8,
    sinc_kernel=65,
    conv_channels=(8, 8),
    audio_dense=(32, 32),
    text_lstm=8,
    text_filters=8,
    text_dense=(32,),
    fusion_seg=8,
    fusion_dim=16,
    fusion_hidden=16,
)

CAMSER_VARIANTS = {
    "mfcc": dict(features=("mfcc",)),
    "spec": dict(features=("spec",)),
    "enc": dict(features=("enc",), co_attention=False),
    "enc+coatt": dict(features=("enc",)),
    "mfcc+enc": dict(features=("mfcc", "enc"), co_attention=False),
    "mfcc+enc+coatt": dict(features=("mfcc", "enc")),
    "spec+enc": dict(features=("spec", "enc"), co_attention=False),
    "spec+enc+coatt": dict(features=("spec", "enc")),
    "all": dict(co_attention=False),
    "all+coatt": dict(),
    "all+coatt-relu-nopool": dict(coatt_activation="relu", mfcc_pool=1),
}
ADF_VARIANTS = {
    "F-I": dict(fusion="F-I"),
    "F-II": dict(fusion="F-II"),
    "F-III": dict(fusion="F-III"),
    "audio": dict(modality="audio"),
    "text": dict(modality="text"),
    "F-III-rms": dict(wave_norm="rms"),
}


def _randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm running statistics, so eval mode is not an identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _stats(rng: np.random.Generator) -> dict:
    def pair(d, loc=0.0):
        return (rng.normal(loc, 1.0, d).astype(np.float32), rng.uniform(0.5, 2.0, d).astype(np.float32))

    return {
        "mfcc_seg": pair(40, -5),
        "spec_seg": pair(200, 1),
        "enc_seg": pair(ENC),
        "words_static": pair(ENC),
    }


# ---------------------------------------------------------------------------------------------
# samples (per-utterance dicts as app.analysis.inputs builds them)
# ---------------------------------------------------------------------------------------------


def _camser_sample(rng: np.random.Generator, n_seg: int, tail: int) -> dict:
    """``n_seg`` segments; the last one has only ``tail`` real frames (zero-padded like _segments)."""
    mfcc = rng.normal(-5, 3, (n_seg, 300, 40)).astype(np.float32)
    spec = np.abs(rng.normal(1, 1, (n_seg, 300, 200))).astype(np.float32)
    enc = rng.normal(0, 1, (n_seg, 150, ENC)).astype(np.float32)
    mfcc[-1, tail:] = 0
    spec[-1, tail:] = 0
    enc[-1, tail // 2 :] = 0
    return {"mfcc_seg": mfcc, "spec_seg": spec, "enc_seg": enc, "seg_mask": np.ones(n_seg, np.float32)}


def _camser_samples(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    shapes = [(1, 300), (2, 120), (1, 40), (3, 250), (2, 300), (1, 1), (2, 7), (1, 200)]
    return [_camser_sample(rng, s, t) for s, t in shapes]


def _adf_sample(rng: np.random.Generator, n_samples: int, n_words: int) -> dict:
    wave = (rng.normal(0, 0.1, n_samples) * np.sin(np.arange(n_samples) / 300.0)).astype(np.float32)
    words = rng.normal(0, 1, (n_words, ENC)).astype(np.float32)
    return {
        "waveform": wave,
        "waveform_mask": np.ones(n_samples, np.float32),
        "words_static": words,
        "words_mask": np.ones(n_words, np.float32),
    }


def _adf_samples(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = [(8000, 5), (2500, 1), (4000, 3), (12345, 7), (4161, 2), (800, 4), (16000, 6), (6000, 1)]
    samples = [_adf_sample(rng, n, w) for n, w in lengths]
    # the empty transcript (one all-zero word, mask 1) and digital silence
    samples[1]["words_static"][:] = 0
    samples[5]["waveform"][:] = 0
    return samples


def _build(kind: str, overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    stats = _stats(np.random.default_rng(seed))
    if kind == "ca-mser":
        model = CaMser(CaMserConfig(**TINY_CAMSER, **overrides), N_CLASSES, stats)
    else:
        model = Adf(AdfConfig(**TINY_ADF, **overrides), N_CLASSES, stats)
    _randomise_norms(model, seed)
    return model.eval()


def _tensors(batch: dict, names) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(batch[n]) for n in names)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check_variant(model, samples, tmp_path):
    names = model.input_names
    batch = collate(samples, names)
    with torch.no_grad():
        logits = model(*_tensors(batch, names)).numpy()
        alone = np.concatenate([model(*_tensors(collate([s], names), names)).numpy() for s in samples])
    assert logits.shape == (len(samples), N_CLASSES)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, alone, atol=1e-5, rtol=0)  # padding invariance

    # ONNX: export on a 2-sample batch of mixed lengths (no axis of size 1 to specialise on)
    path = tmp_path / "model.onnx"
    export_batch = collate(samples[2:4], names)
    torch.onnx.export(
        model,
        _tensors(export_batch, names),
        str(path),
        input_names=list(names),
        output_names=["logits"],
        dynamic_axes={n: {0: "batch", 1: f"{n}_len"} for n in names} | {"logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(names)
    # batch 1 (a long sample and a very short one: 800 samples of silence for ADF) and batch 8
    for subset, expected in ((samples[3:4], alone[3:4]), (samples[5:6], alone[5:6]), (samples, logits)):
        feed = collate(subset, names)
        (out,) = sess.run(["logits"], {n: feed[n] for n in names})
        assert np.isfinite(out).all()
        np.testing.assert_allclose(_softmax(out), _softmax(expected), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# CA-MSER
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(CAMSER_VARIANTS))
def test_camser_variant(variant, tmp_path):
    model = _build("ca-mser", CAMSER_VARIANTS[variant])
    feats = model.cfg.features
    expected = tuple(
        n for f, n in (("mfcc", "mfcc_seg"), ("spec", "spec_seg"), ("enc", "enc_seg")) if f in feats
    )
    assert model.input_names == expected + ("seg_mask",)
    _check_variant(model, _camser_samples(), tmp_path)


def test_camser_trains_and_segments_average():
    model = _build("ca-mser", {})
    samples = _camser_samples()[:4]
    batch = _tensors(collate(samples, model.input_names), model.input_names)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(*batch), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # utterance logits = mean of its segment logits
    model.eval()
    s = samples[3]  # 3 segments
    with torch.no_grad():
        whole = model(*_tensors(collate([s]), model.input_names))
        per_seg = [
            model(*_tensors(collate([{k: v[i : i + 1] for k, v in s.items()}]), model.input_names))
            for i in range(3)
        ]
    torch.testing.assert_close(whole, torch.stack(per_seg).mean(0), atol=1e-5, rtol=0)


def test_adaptive_avg_matrix_matches_torch():
    x = torch.randn(2, 3, 8, 5)
    ours = adaptive_avg_matrix(8, 6) @ x @ adaptive_avg_matrix(5, 6).t()
    torch.testing.assert_close(ours, torch.nn.AdaptiveAvgPool2d((6, 6))(x))


def test_alexnet_pretrained_state_dict(tmp_path):
    widths = (4, 8, 8, 8, 8)
    src = AlexNetFeatures(widths, (300, 200))
    state = {f"features.{k}": v.clone() for k, v in src.features.state_dict().items()}
    rgb = torch.randn(4, 3, 11, 11)
    state["features.0.weight"] = rgb  # ImageNet weights take 3 channels
    state["classifier.1.weight"] = torch.randn(7, 7)  # ignored
    path = tmp_path / "alexnet.pt"
    torch.save(state, path)
    model = CaMser(CaMserConfig(**TINY_CAMSER, alexnet_state_dict=str(path)), N_CLASSES)
    feats = model.spec.alexnet.features
    torch.testing.assert_close(feats[0].weight, rgb.sum(dim=1, keepdim=True))
    torch.testing.assert_close(feats[3].weight, state["features.3.weight"])
    torch.testing.assert_close(feats[10].bias, state["features.10.bias"])
    bad = dict(state, **{"features.3.weight": torch.randn(9, 4, 5, 5)})
    torch.save(bad, path)
    with pytest.raises(ValueError, match="alexnet_widths"):
        CaMser(CaMserConfig(**TINY_CAMSER, alexnet_state_dict=str(path)), N_CLASSES)


# ---------------------------------------------------------------------------------------------
# ADF
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(ADF_VARIANTS))
def test_adf_variant(variant, tmp_path):
    model = _build("adf", ADF_VARIANTS[variant])
    modality = model.cfg.modality
    expected = {
        "both": ("waveform", "waveform_mask", "words_static", "words_mask"),
        "audio": ("waveform", "waveform_mask"),
        "text": ("words_static", "words_mask"),
    }[modality]
    assert model.input_names == expected
    _check_variant(model, _adf_samples(), tmp_path)


def test_adf_sliding_is_exactly_per_chunk():
    """One trunk pass + strided dense == every 250-ms chunk at a 10-ms shift, averaged."""
    model = _build("adf", {"modality": "audio"})
    audio_net = model.audio
    rng = np.random.default_rng(1)
    for n in (1000, 4000, 4159, 4160, 11111):
        wave = torch.from_numpy(rng.normal(0, 0.2, (1, n)).astype(np.float32))
        mask = torch.ones(1, n)
        with torch.no_grad():
            x = audio_net.normalise(wave, mask)
            sliding = audio_net.embed_sliding(x, mask)[0]
            chunks = torch.from_numpy(waveform_chunks(x[0].numpy()))
            naive = audio_net.embed_chunks(chunks).mean(dim=0)
        torch.testing.assert_close(sliding, naive, atol=1e-5, rtol=1e-5)


def test_adf_trains_on_random_chunks():
    model = _build("adf", {})
    model.train()
    samples = _adf_samples()[:4]
    batch = _tensors(collate(samples, model.input_names), model.input_names)
    logits = model(*batch)
    assert logits.shape == (4, N_CLASSES)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert model.audio.trunk.sinc.low_hz_.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # random chunks stay inside each utterance's valid samples
    wave, mask = batch[0], batch[1]
    chunks = model.audio.random_chunks(
        torch.arange(wave.shape[1], dtype=torch.float32).expand_as(wave) + 1, mask
    )
    ends = chunks.amax(dim=-1)
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=model.cfg.chunk_samples)
    assert (ends <= lengths).all()


def test_camser_rejects_unknown_feature():
    with pytest.raises(ValueError, match="subset"):
        CaMserConfig(features=("mfcc", "w2v"))


def test_adf_rejects_inexact_shift():
    with pytest.raises(ValueError, match="exact"):
        AdfConfig(pools=(3, 3, 3))


def test_registry_and_presets():
    model, cfg = build_model("adf", N_CLASSES, fusion="F-II", **TINY_ADF)
    assert isinstance(model, Adf) and cfg.fusion == "F-II"
    model, cfg = build_model("ca-mser", N_CLASSES, features=["enc", "mfcc"], **TINY_CAMSER)
    assert cfg.features == ("mfcc", "enc") and model.input_names == ("mfcc_seg", "enc_seg", "seg_mask")
    paper = Adf(AdfConfig(preset="paper"), N_CLASSES)
    assert paper.audio.out_dim == 2048 and paper.text.out_dim == 4800
    paper = CaMser(CaMserConfig(preset="paper"), N_CLASSES)
    assert paper.mfcc.proj.in_features == 300 * 512 and paper.spec.proj.in_features == 9216
