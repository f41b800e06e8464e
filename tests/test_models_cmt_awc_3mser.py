"""cmt-awc and 3m-ser (and the shared layers): shapes, padding invariance, empty transcripts, ONNX parity.

Small sizes keep the whole file to seconds on 2 CPU cores; the architecture is the same as the default.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.models import build_model
from training.models import cmt_awc as cmt
from training.models import three_m_ser as mser
from training.models.layers import (
    AttentionPool,
    InputNorm,
    MaskedBiLSTM,
    MultiHeadAttention,
    masked_mean,
    masked_softmax,
    reverse_padded,
)

torch.set_num_threads(2)

N_CLASSES = 4
TEXT_DIM = 16
ENC_DIM = 12

# feature shape (without batch/step axes) and which length group each input belongs to
SHAPES = {
    "frames33": (33,),
    "words": (TEXT_DIM,),
    "enc_patches": (ENC_DIM,),
    "encoder": (ENC_DIM,),
    "logmel_patches": (96, 64),
}
GROUP = {
    "frames33": "T",
    "encoder": "T",
    "words": "W",
    "enc_patches": "P",
    "logmel_patches": "P",
    "patch_mask": "P",
}
RANGES = {"T": (3, 41), "W": (1, 8), "P": (1, 6)}


def _group(name: str) -> str:
    return GROUP.get(name) or GROUP[name.rsplit("_", 1)[0]]


def make_samples(names, n, rng, empty_text=False):
    """``n`` per-utterance input dicts with random lengths (raw, unnormalised values)."""
    samples = []
    for i in range(n):
        lengths = {g: int(rng.integers(*r)) for g, r in RANGES.items()}
        if empty_text and i == 0:
            lengths["W"] = 1
        s = {}
        for name in names:
            L = lengths[_group(name)]
            if name.endswith("_mask"):
                s[name] = np.ones(L, np.float32)
            elif name.endswith("_cm"):
                s[name] = rng.random(L).astype(np.float32)
            else:
                s[name] = (rng.standard_normal((L,) + SHAPES[name]) * 3 + 1).astype(np.float32)
        if empty_text and i == 0:  # the app's empty transcript: one all-zero word, CM 0, mask 1
            s["words"] = np.zeros((1, TEXT_DIM), np.float32)
            if "words_cm" in s:
                s["words_cm"] = np.zeros(1, np.float32)
        samples.append(s)
    return samples


def collate(samples, names):
    out = []
    for name in names:
        arrays = [s[name] for s in samples]
        longest = max(a.shape[0] for a in arrays)
        b = np.zeros((len(arrays), longest) + arrays[0].shape[1:], np.float32)
        for i, a in enumerate(arrays):
            b[i, : a.shape[0]] = a
        out.append(b)
    return out


def as_torch(arrays):
    return [torch.from_numpy(a) for a in arrays]


def random_stats(rng):
    return {
        name: (
            rng.standard_normal(shape[-1]).astype(np.float32),
            (rng.random(shape[-1]) + 0.5).astype(np.float32),
        )
        for name, shape in SHAPES.items()
    }


CMT_SMALL = dict(text_dim=TEXT_DIM, lstm_hidden=8, ffn_dim=16, pool_hidden=8, fc_hidden=8, sa_hidden=4)
CMT_CASES = [dict(variant=v) for v in cmt.VARIANTS] + [
    dict(variant="sdpa-correction", frame_stride=1),
    dict(variant="sa-correction", sa_correct_audio=False, frame_stride=3),
    dict(variant="sdpa-correction", acoustic="encoder", frames_dim=ENC_DIM),
]
MSER_SMALL = dict(text_dim=TEXT_DIM, enc_dim=ENC_DIM, d_model=16, head_hidden=8, vggish_width=2, vggish_fc=8)
MSER_CASES = [
    dict(layer_norm=True, audio="encoder", pool="mean"),
    dict(layer_norm=False, audio="encoder", pool="mean"),
    dict(layer_norm=True, audio="encoder", pool="first"),
    dict(layer_norm=True, audio="vggish", pool="mean"),
    dict(layer_norm=False, audio="vggish", pool="first"),
]
CASES = [("cmt-awc", {**CMT_SMALL, **c}) for c in CMT_CASES] + [
    ("3m-ser", {**MSER_SMALL, **c}) for c in MSER_CASES
]
IDS = [
    f"{m}-" + "-".join(f"{k}={v}" for k, v in c.items() if k not in {**CMT_SMALL, **MSER_SMALL})
    for m, c in CASES
]


def build(model_id, overrides, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, _ = build_model(model_id, N_CLASSES, random_stats(rng), **overrides)
    return model


@pytest.mark.parametrize(("model_id", "overrides"), CASES, ids=IDS)
def test_shapes_and_gradients(model_id, overrides):
    model = build(model_id, overrides)
    rng = np.random.default_rng(1)
    names = model.input_names
    batch = as_torch(collate(make_samples(names, 5, rng), names))
    model.train()
    logits = model(*batch)
    assert logits.shape == (5, N_CLASSES)
    torch.nn.functional.cross_entropy(logits, torch.arange(5) % N_CLASSES).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("model_id", "overrides"), CASES, ids=IDS)
def test_padding_invariance_and_empty_transcript(model_id, overrides):
    model = build(model_id, overrides).eval()
    rng = np.random.default_rng(2)
    names = model.input_names
    samples = make_samples(names, 6, rng, empty_text=True)
    with torch.no_grad():
        together = model(*as_torch(collate(samples, names)))
        alone = torch.cat([model(*as_torch(collate([s], names))) for s in samples])
    assert torch.isfinite(together).all() and torch.isfinite(alone).all()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def export(model, names, example) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(example),
            f,
            input_names=list(names),
            output_names=["logits"],
            dynamic_axes={n: {0: "batch", 1: f"{n}_len"} for n in names} | {"logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return f.getvalue()


@pytest.mark.parametrize(("model_id", "overrides"), CASES, ids=IDS)
def test_onnx_parity(model_id, overrides):
    model = build(model_id, overrides).eval()
    names = model.input_names
    rng = np.random.default_rng(3)
    # export with one set of lengths, run with others: proves no length or batch is baked in
    onnx_bytes = export(model, names, as_torch(collate(make_samples(names, 2, rng), names)))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(names)
    for n, empty in ((1, False), (1, True), (8, True)):
        arrays = collate(make_samples(names, n, rng, empty_text=empty), names)
        got = session.run(["logits"], dict(zip(names, arrays, strict=True)))[0]
        with torch.no_grad():
            want = model(*as_torch(arrays))
        assert np.isfinite(got).all()
        np.testing.assert_allclose(
            torch.softmax(torch.from_numpy(got), -1).numpy(),
            torch.softmax(want, -1).numpy(),
            atol=1e-4,
            rtol=0,
        )


def test_input_names_per_variant():
    names = {v: cmt.CmtAwc(cmt.CmtAwcConfig(variant=v, **CMT_SMALL), 4).input_names for v in cmt.VARIANTS}
    plain = ("frames33", "frames33_mask", "words", "words_mask")
    full = ("frames33", "frames33_cm", "frames33_mask", "words", "words_cm", "words_mask")
    assert names == {"base-nocross": plain, "base": plain, "sa-correction": full, "sdpa-correction": full}
    text_only_cm = cmt.CmtAwc(cmt.CmtAwcConfig(variant="sa-correction", sa_correct_audio=False), 4)
    assert text_only_cm.input_names == ("frames33", "frames33_mask", "words", "words_cm", "words_mask")
    on_encoder = cmt.CmtAwc(cmt.CmtAwcConfig(acoustic="encoder"), 4)
    assert on_encoder.input_names == (
        "encoder",
        "encoder_cm",
        "encoder_mask",
        "words",
        "words_cm",
        "words_mask",
    )
    assert (on_encoder.config.frames_dim, on_encoder.config.frame_stride) == (384, 2)
    enc = mser.ThreeMSer(mser.ThreeMSerConfig(**MSER_SMALL), 4)
    vgg = mser.ThreeMSer(mser.ThreeMSerConfig(audio="vggish", **MSER_SMALL), 4)
    assert enc.input_names == ("words", "words_mask", "enc_patches", "patch_mask")
    assert vgg.input_names == ("words", "words_mask", "logmel_patches", "patch_mask")


def test_configs_presets_and_train_defaults():
    paper = cmt.CmtAwcConfig(preset="paper")
    assert (paper.lstm_hidden, paper.ffn_dim, paper.n_layers, paper.n_heads) == (256, 2048, 3, 8)
    assert paper.frame_stride == 1 and paper.d_model == 512
    assert cmt.CmtAwcConfig(preset="paper", lstm_hidden=48).lstm_hidden == 48  # explicit wins
    assert cmt.CmtAwcConfig().variant == "sa-correction" and cmt.CmtAwcConfig().dropout == 0.4
    with pytest.raises(ValueError):
        cmt.CmtAwcConfig(variant="nope")
    with pytest.raises(ValueError):
        mser.ThreeMSerConfig(audio="nope")
    for defaults in (cmt.TRAIN_DEFAULTS, mser.TRAIN_DEFAULTS):
        assert {"lr", "weight_decay", "batch_size", "epochs", "patience"} <= set(defaults)
    assert mser.TRAIN_DEFAULTS["members"] == 5 and cmt.TRAIN_DEFAULTS["members"] == 3


def test_vggish_loads_local_state_dict(tmp_path):
    torch.manual_seed(5)
    source = mser.VGGish(width=2, fc=8, out_dim=16)
    path = tmp_path / "vggish.pth"
    # torchvggish layout plus the PCA entries the real file may carry, which must be ignored
    torch.save({**source.state_dict(), "pproc._pca_means": torch.zeros(128)}, path)
    cfg = mser.ThreeMSerConfig(audio="vggish", vggish_state_dict=str(path), **MSER_SMALL)
    model = mser.ThreeMSer(cfg, N_CLASSES, random_stats(np.random.default_rng(0)))
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.vggish.state_dict()[k], v)
    assert not any(p.requires_grad for p in model.vggish.parameters())  # frozen, as in the paper
    assert model.norm_audio.identity or bool((model.norm_audio.mean == 0).all())  # raw log-mel in

    # the 3m-ser wrapper's prefix and a nested "state_dict" are accepted too; trainable on request
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {f"vggish.{k}": v for k, v in source.state_dict().items()}}, nested)
    cfg = mser.ThreeMSerConfig(
        audio="vggish", vggish_state_dict=str(nested), vggish_trainable=True, **MSER_SMALL
    )
    model = mser.ThreeMSer(cfg, N_CLASSES)
    assert all(p.requires_grad for p in model.vggish.parameters())
    with pytest.raises(FileNotFoundError):
        mser.ThreeMSer(mser.ThreeMSerConfig(audio="vggish", vggish_state_dict=str(tmp_path / "x")), 4)


# ---- shared layers ----


def test_masked_softmax_zero_weight_and_no_nan():
    scores = torch.randn(2, 5)
    mask = torch.tensor([[1.0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    p = masked_softmax(scores, mask, dim=-1)
    assert torch.isfinite(p).all()
    assert (p[0, 2:] == 0).all() and torch.allclose(p[0].sum(), torch.tensor(1.0))
    assert (p[1] == 0).all()  # all padding: zeros, not NaN
    assert torch.equal(masked_mean(torch.ones(2, 5, 3), mask), torch.tensor([[1.0] * 3, [0.0] * 3]))


def test_input_norm():
    norm = InputNorm(np.array([1.0, 2.0]), np.array([2.0, 0.0]))
    assert torch.allclose(norm(torch.tensor([[3.0, 5.0]])), torch.tensor([[1.0, 3.0]]))  # std 0 -> 1
    ident = InputNorm.from_stats({}, "x", 2)
    assert torch.equal(ident(torch.ones(1, 2)), torch.ones(1, 2))
    assert set(ident.state_dict()) == {"mean", "std"}
    assert InputNorm.from_stats(None, "x").identity


class _Stack(torch.nn.Module):
    """BLSTM -> self-attention (same tensor as query, key and value) -> attention pooling."""

    def __init__(self):
        super().__init__()
        self.lstm = MaskedBiLSTM(5, 6, num_layers=2)
        self.attn = MultiHeadAttention(12, 4)
        self.pool = AttentionPool(12)

    def forward(self, x, mask):
        h = self.lstm(x, mask)
        a, _ = self.attn(h, h, mask, mask)
        z, _ = self.pool(a, mask)
        return z


def test_layers_padding_invariance_and_dynamic_onnx():
    torch.manual_seed(0)
    model = _Stack().eval()
    lengths = [9, 4, 1, 6]
    x = torch.zeros(4, 9, 5)
    mask = torch.zeros(4, 9)
    for i, L in enumerate(lengths):
        x[i, :L] = torch.randn(L, 5)
        mask[i, :L] = 1
    with torch.no_grad():
        together = model(x, mask)
        for i, L in enumerate(lengths):
            torch.testing.assert_close(
                model(x[i : i + 1, :L], mask[i : i + 1, :L])[0], together[i], atol=1e-6, rtol=0
            )
        h = model.lstm(x, mask)
        assert (h[mask == 0] == 0).all()
        # the backward direction's gather: a flip within each valid length, padding left in place
        r = reverse_padded(x, mask)
        for i, L in enumerate(lengths):
            assert torch.equal(r[i, :L], x[i, :L].flip(0)) and torch.equal(r[i, L:], x[i, L:])
        assert torch.equal(reverse_padded(r, mask), x)
    names = ["x", "mask"]
    onnx_bytes = export(model, names, (x[:2, :7], mask[:2, :7]))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    for B, T in ((1, 3), (4, 9), (3, 12)):
        xx = torch.randn(B, T, 5)
        mm = torch.ones(B, T)
        mm[-1, T // 2 :] = 0
        if B > 1:
            mm[0] = 0  # an all-padding row: ONNX Runtime must not give NaN
        got = session.run(None, {"x": xx.numpy(), "mask": mm.numpy()})[0]
        with torch.no_grad():
            want = model(xx, mm).numpy()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_variant_names_tell_configs_apart():
    from training.trainer import variant_of

    assert variant_of(cmt.CmtAwcConfig()) == "sa-correction"
    assert variant_of(cmt.CmtAwcConfig(acoustic="encoder")) == "sa-correction-encoder"
    assert variant_of(cmt.CmtAwcConfig(variant="base", preset="paper")) == "base-paper"
    assert variant_of(mser.ThreeMSerConfig(layer_norm=False, audio="vggish")) == "no-layernorm-vggish"
