"""CA-MSER: co-attention over multi-level acoustic information (seed 002, Zou et al.; SPEC §1).

Audio only. Every 3-s segment of an utterance goes through three encoders:

* MFCC-40 (300 x 40) -> BiLSTM (2 layers, dropout 0.5) -> flatten (300 x 2H) -> Linear 128 (eq. 1);
* linear spectrogram (300 x 200 image) -> AlexNet convolutional stack -> 6 x 6 average pool
  -> flatten -> Linear 128 (eq. 2);
* encoder frames (150 x E; Whisper encoder frames substitute wav2vec2, SPEC §2), eq. 3.

Co-attention (eq. 4-5): ``Linear([x'_m; x'_s])`` gives one weight per encoder frame; the weighted
sum of the frames -> Linear 128 is the "W2E". The head (eq. 6) maps ``[x'_m; x'_s; x''_w]`` ->
128 -> 128 -> classes. As in the paper, an utterance's prediction combines all its segments: here
the mean of the segment logits over the real segments (``seg_mask``).

Variants (paper Table 2): ``features`` any non-empty subset of {"mfcc", "spec", "enc"} and
``co_attention`` on/off (off: the encoder frames are mean-pooled). ``input_names`` lists only the
inputs a variant reads.

Inputs arrive raw (``app.analysis.inputs``): ``mfcc_seg`` (B, S, 300, 40), ``spec_seg`` (B, S, 300, 200),
``enc_seg`` (B, S, 150, E), ``seg_mask`` (B, S). Each is standardised inside the graph with the
training-split statistics (``InputNorm``). Frames that are exactly zero in the raw input are the
zero-padding of the last segment (``model_inputs._segments``): they are kept at zero after
normalisation, so the padded tail looks the same whatever the statistics (zero is also what the
paper's zero-padded audio gives a log(1 + |STFT|) spectrogram).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.layers import InputNorm, masked_mean, masked_softmax

FEATURES = ("mfcc", "spec", "enc")
_INPUT_OF = {"mfcc": "mfcc_seg", "spec": "spec_seg", "enc": "enc_seg"}

# Sizes that the presets fill in (fields left at None). The paper's MFCC BiLSTM (256 hidden ->
# a 153600 x 128 flatten layer, 20M weights) and full-width AlexNet (~0.7 GMAC per 300 x 200 image)
# do not fit the CPU training budget (5 folds + final fit of ~650 utterances in ~10 min), so the
# default keeps the structure with narrower layers: a 32-unit BiLSTM over MFCC frames averaged in
# pairs (150 steps), and AlexNet at 1/8 of its widths (~14 MMAC per image). ~7 s per epoch on one core.
PRESETS = {
    "default": dict(mfcc_hidden=32, mfcc_pool=2, alexnet_widths=(8, 24, 48, 32, 32)),
    "paper": dict(mfcc_hidden=256, mfcc_pool=1, alexnet_widths=(64, 192, 384, 256, 256)),
}
PAPER_ALEXNET_WIDTHS = PRESETS["paper"]["alexnet_widths"]

# Defaults for training/train.py. The paper used AdamW lr 1e-5, batch 64, early stop after 8 epochs,
# with an ImageNet-pretrained AlexNet and a fine-tuned wav2vec2; from scratch on ~650 utterances a
# larger learning rate is needed. Batch 64 as in the paper (it also amortises the LSTM's per-step cost).
# lr 2e-3, batch 32, 30 epochs (6-fold CV on RAVDESS: lr 5e-4/batch 64/15 epochs 48.6%,
# lr 2e-3 61.5%, lr 4e-3 61.6% balanced accuracy)
TRAIN_DEFAULTS = dict(lr=2e-3, weight_decay=1e-2, batch_size=32, epochs=30, patience=8)


@dataclass
class CaMserConfig:
    """Configuration; ``preset`` fills every size left at None ("default" for CPU, "paper")."""

    preset: str = "default"
    features: tuple[str, ...] = FEATURES
    co_attention: bool = True
    # "softmax" (SPEC: a distribution over the valid frames) or "relu" (the official code:
    # unnormalised ReLU weights, its softmax line is commented out)
    coatt_activation: str = "softmax"
    mfcc_l2: bool = True  # the official code L2-normalises MFCC frames before the BiLSTM
    mfcc_hidden: int | None = None
    # average consecutive MFCC frames before the BiLSTM (1 = paper): 2 halves the 300 sequential
    # LSTM steps, the dominant training cost on CPU
    mfcc_pool: int | None = None
    mfcc_layers: int = 2
    lstm_dropout: float = 0.5
    alexnet_widths: tuple[int, ...] | None = None  # conv1..conv5 channels
    alexnet_state_dict: str | None = None  # local torchvision AlexNet state dict (paper widths)
    seg_frames: int = 300
    mfcc_dim: int = 40
    spec_bins: int = 200
    enc_frames: int = 150
    enc_dim: int = 384
    d: int = 128
    dropout: float = 0.1
    # how segment logits make the utterance's: "mean" over real segments, or "duration" = weighted
    # by each segment's share of real (non-padding) frames, so a zero-padded 0.5-s tail counts for
    # 1/6 of a full 3-s segment instead of as much
    segment_weighting: str = "mean"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        requested = {self.features} if isinstance(self.features, str) else set(self.features)
        if not requested or requested - set(FEATURES):
            raise ValueError(f"features must be a non-empty subset of {FEATURES}, got {self.features!r}")
        self.features = tuple(f for f in FEATURES if f in requested)  # canonical order
        self.alexnet_widths = tuple(int(w) for w in self.alexnet_widths)
        if len(self.alexnet_widths) != 5:
            raise ValueError("alexnet_widths needs 5 values (conv1..conv5)")
        if self.seg_frames % self.mfcc_pool:
            raise ValueError("mfcc_pool must divide seg_frames")
        if self.segment_weighting not in ("mean", "duration"):
            raise ValueError("segment_weighting must be 'mean' or 'duration'")
        if self.coatt_activation not in ("softmax", "relu"):
            raise ValueError("coatt_activation must be 'softmax' or 'relu'")


def _nonzero_frames(x: Tensor) -> Tensor:
    """(..., T, D) -> (..., T, 1): 1.0 where a raw frame is not all zeros (i.e. not padding)."""
    return (x.abs().sum(dim=-1, keepdim=True) > 0).to(x.dtype)


class MfccBranch(nn.Module):
    """Eq. 1: ``x'_m = f_m(BiLSTM(x_m))``; f_m = dropout -> Linear(300 / pool * 2H, 128) -> ReLU.

    Segments always have ``seg_frames`` frames (the last one zero-padded, as in the paper), so a
    plain ``nn.LSTM`` is padding-invariant here: batching only adds whole masked-out segments.
    """

    def __init__(self, cfg: CaMserConfig, stats: dict):
        super().__init__()
        pool, hidden = cfg.mfcc_pool, cfg.mfcc_hidden
        assert pool is not None and hidden is not None  # CaMserConfig.__post_init__ fills them
        self.l2 = cfg.mfcc_l2
        self.pool, self.steps = pool, cfg.seg_frames // pool
        self.norm = InputNorm.from_stats(stats, "mfcc_seg", cfg.mfcc_dim)
        self.lstm = nn.LSTM(
            cfg.mfcc_dim,
            hidden,
            num_layers=cfg.mfcc_layers,
            batch_first=True,
            dropout=cfg.lstm_dropout if cfg.mfcc_layers > 1 else 0.0,
            bidirectional=True,
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(self.steps * 2 * hidden, cfg.d)

    def forward(self, x: Tensor) -> Tensor:  # (N, 300, 40) -> (N, d)
        x = self.norm(x) * _nonzero_frames(x)
        if self.pool > 1:
            x = x.reshape(x.shape[0], self.steps, self.pool, x.shape[-1]).mean(dim=2)
        if self.l2:
            x = F.normalize(x, p=2.0, dim=-1)  # zero (padding) frames stay zero
        h, _ = self.lstm(x)
        return F.relu(self.proj(self.drop(h.flatten(1))))


def adaptive_avg_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) averaging matrix equal to ``AdaptiveAvgPool1d(n_out)`` on ``n_in`` steps.

    ``nn.AdaptiveAvgPool2d((6, 6))`` does not export to ONNX when 6 does not divide the input size
    (8 x 5 for a 300 x 200 spectrogram); two matmuls with these matrices compute the same thing.
    """
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, math.ceil((i + 1) * n_in / n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _side(v: int | str | tuple[int, ...]) -> int:
    """One side of a square conv/pool kernel size, stride or padding (an int or a per-axis tuple)."""
    assert not isinstance(v, str)  # padding="same"/"valid" is not used in AlexNet's stack
    return v if isinstance(v, int) else v[0]


class AlexNetFeatures(nn.Module):
    """AlexNet's convolutional stack (torchvision layout, so ``features.N.*`` keys load as they are).

    One input channel: a spectrogram is grey. Loading 3-channel ImageNet weights sums conv1 over its
    input channels, which is exactly feeding the grey image to all three channels. Output: the
    torchvision ``avgpool`` (adaptive 6 x 6 average) as fixed matrices, (N, C5, 6, 6).
    """

    pool_h: Tensor  # buffers: (6, H) and (6, W) averaging matrices
    pool_w: Tensor

    def __init__(self, widths: tuple[int, ...], image_hw: tuple[int, int]):
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=11, stride=4, padding=2),  # 0
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),  # 3
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),  # 6
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),  # 8
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),  # 10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        h, w = self._feature_hw(image_hw)
        self.register_buffer("pool_h", adaptive_avg_matrix(h, 6), persistent=False)
        self.register_buffer("pool_w", adaptive_avg_matrix(w, 6), persistent=False)
        self.out_dim = c5 * 36

    def _feature_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        h, w = hw
        for m in self.features:
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
                k, s, p = (_side(v) for v in (m.kernel_size, m.stride, m.padding))
                h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        return h, w

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, H, W) -> (N, C5, 6, 6)
        y = self.features(x)
        return torch.matmul(torch.matmul(self.pool_h, y), self.pool_w.t())

    def load_pretrained(self, path: str | Path) -> None:
        """Load conv weights from a torchvision AlexNet state dict (full model or ``features`` only)."""
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        pattern = re.compile(r"(?:^|\.)(?:features\.)?(\d+)\.(weight|bias)$")
        own = self.features.state_dict()
        new = {}
        for key, value in state.items():
            if "classifier" in key:
                continue
            m = pattern.search(key)
            if not m or f"{m.group(1)}.{m.group(2)}" not in own:
                continue
            name = f"{m.group(1)}.{m.group(2)}"
            if name == "0.weight" and value.shape[1] == 3:
                value = value.sum(dim=1, keepdim=True)  # grey image on all three channels
            if value.shape != own[name].shape:
                raise ValueError(
                    f"AlexNet state dict {path}: {key} has shape {tuple(value.shape)}, model expects "
                    f"{tuple(own[name].shape)} (use alexnet_widths={PAPER_ALEXNET_WIDTHS})"
                )
            new[name] = value
        missing = sorted(set(own) - set(new))
        if missing:
            raise ValueError(f"AlexNet state dict {path} lacks {missing}")
        self.features.load_state_dict(new)


class SpecBranch(nn.Module):
    """Eq. 2: ``x'_s = f_s(AlexNet(x_s))``; f_s = dropout -> Linear(C5 * 36, 128) -> ReLU."""

    def __init__(self, cfg: CaMserConfig, stats: dict):
        super().__init__()
        self.norm = InputNorm.from_stats(stats, "spec_seg", cfg.spec_bins)
        assert cfg.alexnet_widths is not None  # CaMserConfig.__post_init__ fills it
        self.alexnet = AlexNetFeatures(cfg.alexnet_widths, (cfg.seg_frames, cfg.spec_bins))
        if cfg.alexnet_state_dict:
            self.alexnet.load_pretrained(cfg.alexnet_state_dict)
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(self.alexnet.out_dim, cfg.d)

    def forward(self, x: Tensor) -> Tensor:  # (N, 300, 200) -> (N, d)
        x = self.norm(x) * _nonzero_frames(x)
        y = self.alexnet(x.unsqueeze(1))
        return F.relu(self.proj(self.drop(y.flatten(1))))


class EncBranch(nn.Module):
    """Eq. 3-5: encoder frames pooled by co-attention weights (or a plain mean) -> Linear 128.

    Co-attention (eq. 4): ``x'_att = f_att([x'_m; x'_s])``, one score per encoder frame, made a
    distribution over the segment's real frames (``coatt_activation="softmax"``) or ReLU weights as
    in the official code; eq. 5: ``x''_w = x'_att . x'_w``. When neither MFCC nor spectrogram is
    used (Table 2's "W2E (w/ co-att)") the query is the mean of the segment's encoder frames.
    """

    def __init__(self, cfg: CaMserConfig, stats: dict, query_dim: int):
        super().__init__()
        self.co_attention = cfg.co_attention
        self.activation = cfg.coatt_activation
        self.norm = InputNorm.from_stats(stats, "enc_seg", cfg.enc_dim)
        if self.co_attention:
            self.att_drop = nn.Dropout(cfg.dropout)
            self.att = nn.Linear(query_dim or cfg.enc_dim, cfg.enc_frames)
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(cfg.enc_dim, cfg.d)

    def forward(self, e: Tensor, query: Tensor | None) -> Tensor:  # (N, 150, E) -> (N, d)
        valid = _nonzero_frames(e)  # (N, T, 1)
        e = self.norm(e) * valid
        frame_mask = valid.squeeze(-1)
        if not self.co_attention:
            pooled = masked_mean(e, frame_mask, dim=1)
        else:
            if query is None:
                query = masked_mean(e, frame_mask, dim=1)
            scores = self.att(self.att_drop(query))  # (N, T)
            if self.activation == "softmax":
                weights = masked_softmax(scores, frame_mask, dim=1)
            else:
                weights = F.relu(scores) * frame_mask
            pooled = torch.matmul(weights.unsqueeze(1), e).squeeze(1)
        return F.relu(self.proj(self.drop(pooled)))


class CaMser(nn.Module):
    """CA-MSER (seed 002). ``forward(*inputs)`` takes ``input_names`` in order; returns (B, classes)."""

    def __init__(self, cfg: CaMserConfig, n_classes: int, stats: dict | None = None):
        super().__init__()
        stats = stats or {}
        self.cfg = cfg
        feats = cfg.features
        self.mfcc = MfccBranch(cfg, stats) if "mfcc" in feats else None
        self.spec = SpecBranch(cfg, stats) if "spec" in feats else None
        query_dim = cfg.d * (("mfcc" in feats) + ("spec" in feats))
        self.enc = EncBranch(cfg, stats, query_dim) if "enc" in feats else None
        d_in = cfg.d * len(feats)
        # Eq. 6 head, dropout before each layer as in the official code.
        self.head = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(d_in, cfg.d),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d, cfg.d),
            nn.ReLU(),
            nn.Linear(cfg.d, n_classes),
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(_INPUT_OF[f] for f in self.cfg.features) + ("seg_mask",)

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"CaMser expects {self.input_names}, got {len(inputs)} tensors")
        x = dict(zip(self.input_names, inputs, strict=True))
        seg_mask = x["seg_mask"]
        cfg = self.cfg
        parts = []
        # Segments are independent: fold (B, S) into one axis of B * S segments.
        if self.mfcc is not None:
            parts.append(self.mfcc(x["mfcc_seg"].reshape(-1, cfg.seg_frames, cfg.mfcc_dim)))
        if self.spec is not None:
            parts.append(self.spec(x["spec_seg"].reshape(-1, cfg.seg_frames, cfg.spec_bins)))
        if self.enc is not None:
            query = torch.cat(parts, dim=-1) if parts else None
            parts.append(self.enc(x["enc_seg"].reshape(-1, cfg.enc_frames, cfg.enc_dim), query))
        seg_logits = self.head(torch.cat(parts, dim=-1))  # (B * S, C)
        seg_logits = seg_logits.reshape(seg_mask.shape[0], -1, seg_logits.shape[-1])
        if cfg.segment_weighting == "duration":
            w = (seg_mask * self._real_share(x)).unsqueeze(-1)
            return (seg_logits * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-6)
        return masked_mean(seg_logits, seg_mask, dim=1)

    def _real_share(self, x: dict[str, Tensor]) -> Tensor:
        """(B, S): share of each segment's frames that are real (not the zero padding)."""
        name = _INPUT_OF[self.cfg.features[0]]
        seg = x[name]
        real = (seg.abs().sum(dim=-1) > 0).to(seg.dtype)  # (B, S, T)
        return real.mean(dim=-1)
