"""3m-ser: multi-head attention fusion of audio and text embeddings (paper 004, Tran et al.).

Architecture (paper 004 Sect. 3 and 4.2, Fig. 2; official code tpnam0901/3m-ser ``MMSERA``; SPEC §1):

* audio: one 128-d embedding per 0.96-s patch, then LayerNorm (the paper's contribution: VGGish
  outputs lie in [0, 255] and BERT's in [-2, 2], so both are layer-normalised before fusion). Two
  audio front ends (``audio``):

  - ``encoder`` (default, SPEC §2 substitute): ``enc_patches`` (Whisper encoder frames mean-pooled per
    0.96 s, 384-d) standardised and projected by a Linear to 128;
  - ``vggish``: the VGGish CNN (Hershey et al. 2017; conv 64-M-128-M-256-256-M-512-512-M, FC
    4096-4096-128, ReLU) over ``logmel_patches`` (P, 96, 64). Parameter names follow the PyTorch port
    ``torchvggish`` (``features.*``, ``embeddings.*``), so a local AudioSet state dict
    (``vggish_state_dict``) loads as is; it is then frozen unless ``vggish_trainable`` (the official
    IEMOCAP config freezes it). The AudioSet PCA/quantisation post-processing is not applied (the
    LayerNorm makes the scale moot). Without a state dict the CNN trains from scratch and its input
    is standardised with the training statistics; with one, raw log-mel goes in as VGGish expects;

* text: ``words`` (one contextual vector per ASR word; BERT 768-d in the paper, MiniLM 384-d here)
  -> 8-head self-attention -> Linear to 128 -> LayerNorm (no residual, as in the official code);
* fusion: text tokens and audio patches concatenated along the sequence axis (masks likewise) ->
  8-head self-attention -> Linear 128 -> LayerNorm -> pooled -> dropout -> Linear 64, leaky ReLU ->
  Linear to the classes. ``pool="first"`` takes the first token (BERT's [CLS] in the paper and the
  official default); here the first token is the first ASR word, as no [CLS] vector is passed, so
  the default is ``"mean"`` (masked mean over all text and audio tokens).

Variants (paper 004 Table 1): ``layer_norm=True`` (3M-SER with LayerNorm, UA 79.96 / WA 80.66) and
``layer_norm=False`` (without the audio LayerNorm, 75.35 / 76.81).

Sizes: the paper's own sizes are small (128-d fusion, 8 heads, 64-unit head) and the sequences are
short (W words + P patches), so the default IS the paper size; the costly paper part is VGGish itself
(72 M parameters, ~1.7 GFLOPs per patch), reachable with ``audio="vggish"``. ``vggish_width`` and
``vggish_fc`` (64 and 4096 in VGGish) only exist to build tiny instances in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from training.models.layers import Dropout, InputNorm, MultiHeadAttention, masked_mean

# Paper 004 follows SERVER / the official code: Adam lr 1e-4, no weight decay, batch size 1, step decay
# (x0.1 every 30 epochs), 200 epochs. Batch 1 wastes a CPU, so batches of 16 with a larger step.
# lr 1e-3 (6-fold CV on RAVDESS: 1e-4 69.4%, 3e-4 69.1%, 1e-3 75.7% balanced accuracy).
# Five seeds averaged into one exported model (SeedEnsemble): single seeds ranged 69.1-75.7% in that
# CV, five members gave 76.9%, at ~1.5 min of CPU per member.
TRAIN_DEFAULTS = dict(lr=1e-3, weight_decay=0.0, batch_size=16, epochs=60, patience=12, members=5)

AUDIO_FRONTENDS = ("encoder", "vggish")
POOLS = ("first", "mean")


@dataclass
class ThreeMSerConfig:
    layer_norm: bool = True  # LayerNorm on the audio embeddings (the paper's two variants)
    audio: str = "encoder"  # "encoder" (enc_patches) or "vggish" (logmel_patches)
    pool: str = "mean"  # "first" (paper, [CLS]) or "mean"
    vggish_state_dict: str | None = None  # local torchvggish-style state dict, loaded when set
    vggish_trainable: bool = False  # fine-tune loaded VGGish weights (always trained when not loaded)
    vggish_width: int = 64  # channels of VGGish's first conv (64); tests use tiny values
    vggish_fc: int = 4096  # VGGish hidden FC size (4096)
    enc_dim: int = 384  # Whisper tiny encoder width
    text_dim: int = 384  # MiniLM width (BERT-base: 768)
    d_model: int = 128  # audio embedding / fusion width (VGGish embedding size)
    n_heads: int = 8
    head_hidden: int = 64
    dropout: float = 0.5  # official code: 0.5 (attention weights and before the head)

    def __post_init__(self):
        if self.audio not in AUDIO_FRONTENDS:
            raise ValueError(f"3m-ser audio {self.audio!r} not in {AUDIO_FRONTENDS}")
        if self.pool not in POOLS:
            raise ValueError(f"3m-ser pool {self.pool!r} not in {POOLS}")


class VGGish(nn.Module):
    """VGGish (Hershey et al. 2017) with ``torchvggish`` parameter names: (N, 1, 96, 64) -> (N, 128)."""

    def __init__(self, width: int = 64, fc: int = 4096, out_dim: int = 128):
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        in_ch = 1
        for v in (w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w, 8 * w, "M"):
            if isinstance(v, str):  # "M"
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(8 * w * 6 * 4, fc),
            nn.ReLU(inplace=True),
            nn.Linear(fc, fc),
            nn.ReLU(inplace=True),
            nn.Linear(fc, out_dim),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (N, C, 6, 4)
        # flatten in (H, W, C) order like the TensorFlow original, so AudioSet weights apply
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return self.embeddings(x)


def load_vggish_state_dict(module: VGGish, path: str | Path) -> None:
    """Load a local VGGish state dict (torchvggish ``vggish-*.pth`` layout) into ``module``.

    Accepts a bare state dict or one nested under ``state_dict`` / ``model``, and keys prefixed with
    ``vggish.`` (the 3m-ser wrapper); PCA post-processing entries (``pproc.*``) are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGGish state dict not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    clean = {}
    for k, v in state.items():
        while k.startswith("vggish."):  # the 3m-ser wrapper nests the port as vggish.vggish.*
            k = k[len("vggish.") :]
        if not k.startswith("pproc"):
            clean[k] = v
    module.load_state_dict(clean, strict=True)


class ThreeMSer(nn.Module):
    """3M-SER; forward returns logits (B, classes)."""

    def __init__(self, config: ThreeMSerConfig, n_classes: int, stats: dict | None = None):
        super().__init__()
        cfg = self.config = config
        stats = stats or {}
        d = cfg.d_model

        # audio front end -> (B, P, d)
        if cfg.audio == "encoder":
            self.norm_audio = InputNorm.from_stats(stats, "enc_patches", cfg.enc_dim)
            self.audio_proj = nn.Linear(cfg.enc_dim, d)
        else:
            pretrained = cfg.vggish_state_dict is not None
            # pretrained VGGish expects raw log-mel; a from-scratch one learns better from z-scores
            self.norm_audio = InputNorm.from_stats({} if pretrained else stats, "logmel_patches", 64)
            self.vggish = VGGish(cfg.vggish_width, cfg.vggish_fc, d)
            if cfg.vggish_state_dict is not None:  # pretrained
                load_vggish_state_dict(self.vggish, cfg.vggish_state_dict)
                self.vggish.requires_grad_(cfg.vggish_trainable)
        self.audio_norm = nn.LayerNorm(d) if cfg.layer_norm else nn.Identity()

        # text: self-attention -> Linear -> LayerNorm
        self.norm_words = InputNorm.from_stats(stats, "words", cfg.text_dim)
        self.text_attn = MultiHeadAttention(cfg.text_dim, cfg.n_heads, cfg.dropout)
        self.text_linear = nn.Linear(cfg.text_dim, d)
        self.text_norm = nn.LayerNorm(d)

        # fusion: self-attention over [text; audio] -> Linear -> LayerNorm
        self.fusion_attn = MultiHeadAttention(d, cfg.n_heads, cfg.dropout)
        self.fusion_linear = nn.Linear(d, d)
        self.fusion_norm = nn.LayerNorm(d)

        self.dropout = Dropout(cfg.dropout)
        self.head = nn.Linear(d, cfg.head_hidden)
        self.classifier = nn.Linear(cfg.head_hidden, n_classes)

    @property
    def input_names(self) -> tuple[str, ...]:
        audio = "enc_patches" if self.config.audio == "encoder" else "logmel_patches"
        return ("words", "words_mask", audio, "patch_mask")

    def _audio(self, x: Tensor) -> Tensor:
        if self.config.audio == "encoder":
            return self.audio_proj(self.norm_audio(x))
        B = x.shape[0]
        patches = self.norm_audio(x).reshape(-1, 1, 96, 64)  # every patch through the CNN
        return self.vggish(patches).reshape(B, -1, self.config.d_model)

    def forward(self, *inputs: Tensor) -> Tensor:
        x = dict(zip(self.input_names, inputs, strict=True))
        t_mask, a_mask = x["words_mask"], x["patch_mask"]

        audio = self.audio_norm(self._audio(x[self.input_names[2]]))

        words = self.norm_words(x["words"])
        t, _ = self.text_attn(words, words, t_mask, t_mask)
        text = self.text_norm(self.text_linear(t))

        # concatenate along the sequence axis; padding sits inside the sequence, which is harmless
        # because attention has no positions and every key is masked explicitly
        fused_in = torch.cat([text, audio], dim=1)
        mask = torch.cat([t_mask, a_mask], dim=1)
        f, _ = self.fusion_attn(fused_in, fused_in, mask, mask)
        fused = self.fusion_norm(self.fusion_linear(f))

        z = fused[:, 0] if self.config.pool == "first" else masked_mean(fused, mask, dim=1)
        h = nn.functional.leaky_relu(self.head(self.dropout(z)))
        return self.classifier(h)
