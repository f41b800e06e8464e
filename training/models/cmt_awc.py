"""cmt-awc: crossmodal transformer + attention weight correction (paper 000, Terui & Yamada).

Architecture (paper 000, Fig. 1-5; SPEC §1), per stream (acoustic frames, ASR words):

* BLSTM: ``e_k = g_k ⊕ h_k`` (eq. 1), acoustic over ``frames33``, text over ``words``;
* crossmodal transformer encoder, ``n_layers`` (3) post-norm layers with ``n_heads`` (8) heads:
  ``x = LN(e + Attention(Q, K, V))`` with ``Attention = softmax(Q K^T / sqrt(d_k)) V`` (eq. 2) and
  ``O = LN(x + FFN(x))``, ``FFN(x) = max(0, x W1 + b1) W2 + b2`` (eq. 3). The acoustic stream takes
  Q from itself and K = V from the text BLSTM output ``f``; the text stream the reverse. As in the
  crossmodal transformer of Tsai et al. (MulT), every layer attends to the other modality's BLSTM
  output (the paper's Fig. 2 shows one layer and does not say otherwise);
* self-attention pooling: ``alpha_k = softmax(y tanh(Y O_k^T))`` (eq. 4), ``z = sum_k alpha_k O_k`` (eq. 5);
* ``z = [z_acoustic; z_text]`` -> fully connected classifier (Linear, ReLU, dropout, Linear).

Variants (paper 000 Table I):

* ``base-nocross``: Q, K and V from the same modality (an ordinary self-attention encoder per stream);
* ``base``: crossmodal encoder as above;
* ``sa-correction`` (proposed method 1): the pooling weights are corrected with the ASR confidence
  ``c_k``: ``s_k = LSTM(alpha_k ⊕ c_k)`` (eq. 6), ``beta = softmax(s)`` (eq. 7), ``z = sum_k beta_k O_k``.
  Applied to the text pooling with the word CM (``words_cm``) and, when ``sa_correct_audio`` (default),
  to the acoustic pooling with the frame CM (``frames33_cm``: the CM of the word covering each frame,
  1.0 outside words), as Sect. II.B describes correcting both text and acoustic weights. The LSTM
  has ``sa_hidden`` units and a Linear maps its output to the scalar ``s_k`` (a 1-unit LSTM would
  bound ``s_k`` to (-1, 1) and make ``beta`` nearly uniform);
* ``sdpa-correction`` (proposed method 2): inside every crossmodal attention, the confidence matrix
  is the outer product of the query-side and key-side CM vectors (acoustic stream:
  ``C = frames33_cm ⊗ words_cm``; text stream: ``C = words_cm ⊗ frames33_cm``); each attention weight
  ``alpha`` (after the softmax of eq. 2) is corrected elementwise by ``s = Linear(alpha ⊕ c)`` (eq. 8)
  and renormalised with a softmax over the keys (eq. 9), one ``Linear(2, 1)`` per layer and stream.
  It starts from weight ``[1, 1]``, bias 0, so more attention and more confidence both mean more
  weight from the first step.

Sizes (``preset``):

* ``default``, sized for CPU training (~650 utterances x 6 fits within minutes on 2 cores): BLSTM 32
  units per direction (d_model 64, 8 heads of 8), FFN 128, 3 layers, pooling 64, FC 64, and
  ``frame_stride=4``: consecutive frames (and their CMs) are averaged 4 by 4 (40 ms) before the
  acoustic BLSTM. At 10 ms the acoustic stream (~350 frames) dominates every cost; the stride cuts
  it 4x, the halved width another ~2x (measured: ~3.5-4.5 s of CPU per epoch of 650 utterances).
* ``paper``: fills the fields left at their defaults with the paper's 10-ms frames
  (``frame_stride=1``) and, where the paper gives no number (it fixes 3 layers, 8 heads, dropout
  0.4), transformer-base-like sizes: BLSTM 256 (d_model 512), FFN 2048, pooling 512, FC 512.

Acoustic input (``acoustic``, not a paper variant): ``"frames33"`` is the paper's 33-d frames (default);
``"encoder"`` feeds the Whisper encoder frames (``encoder``, 384-d at 20 ms, their CMs in ``encoder_cm``)
to the same acoustic stream instead, with ``frame_stride=2`` (40 ms) unless set. It exists to measure
how much of the gap to the pooled-encoder baseline is the 33-d input: a linear probe on mean+std
pooled frames33 reaches ~0.59 balanced accuracy on RAVDESS, on encoder frames ~0.75.

Dropout 0.4 everywhere (paper): inputs, attention weights, residual branches, FFN, classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from training.models.layers import AttentionPool, Dropout, InputNorm, MaskedBiLSTM, MultiHeadAttention

VARIANTS = ("base-nocross", "base", "sa-correction", "sdpa-correction")

# Paper 000 Sect. IV.A: Adam, lr 1e-4, weight decay 1e-9, batch 40, 100 epochs (best epoch kept).
# On 2 CPU cores a fit gets ~80 s (~2.7-4.5 s per epoch of 650 utterances), so fewer epochs with a
# larger step (it converges in ~10 epochs on a synthetic check); patience stops early.
# lr 2e-3 and 60 epochs: with the paper's 1e-4 the CPU-sized model stops far from converged
# (6-fold CV on RAVDESS: lr 5e-4/20 epochs 49.1%, lr 2e-3/40 epochs 56.9% balanced accuracy).
# Three seeds averaged into one exported model (SeedEnsemble): 59.7% -> 62.6% in that CV, and the
# weighted ensemble 78.7% -> 78.9%; ~9 min of CPU per member.
TRAIN_DEFAULTS = dict(lr=2e-3, weight_decay=1e-9, batch_size=40, epochs=60, patience=15, members=3)

ACOUSTIC_INPUTS = ("frames33", "encoder")
PAPER_SIZES = dict(lstm_hidden=256, ffn_dim=2048, pool_hidden=512, fc_hidden=512, frame_stride=1)


@dataclass
class CmtAwcConfig:
    variant: str = "sa-correction"
    preset: str = "default"  # "default" (CPU-sized) or "paper" (see module docstring)
    frames_dim: int = 33
    text_dim: int = 384
    lstm_hidden: int = 32  # per direction; d_model = 2 * lstm_hidden
    n_layers: int = 3
    n_heads: int = 8
    ffn_dim: int = 128
    pool_hidden: int = 64
    fc_hidden: int = 64
    sa_hidden: int = 16  # LSTM units of the eq. 6 correction
    sa_correct_audio: bool = True  # sa-correction also on the acoustic pooling (frame CM)
    frame_stride: int = 4  # average 4 frames (40 ms) before the BLSTM: 4x less work (paper: 1)
    dropout: float = 0.4
    # Per-utterance mean/variance normalisation of the acoustic frames (CMVN). Not in the paper;
    # it removes speaker and channel offsets, which dominate with few training speakers.
    utterance_norm: bool = False
    # "frames33" (paper) or "encoder" (Whisper encoder frames; see the module docstring)
    acoustic: str = "frames33"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"cmt-awc variant {self.variant!r} not in {VARIANTS}")
        if self.preset not in ("default", "paper"):
            raise ValueError(f"cmt-awc preset {self.preset!r} not in ('default', 'paper')")
        if self.acoustic not in ACOUSTIC_INPUTS:
            raise ValueError(f"cmt-awc acoustic {self.acoustic!r} not in {ACOUSTIC_INPUTS}")
        if self.acoustic == "encoder":
            # the encoder's width and 20-ms hop replace the 33-d 10-ms frames' defaults
            if self.frames_dim == 33:
                self.frames_dim = 384
            if self.frame_stride == 4:
                self.frame_stride = 2
        if self.preset == "paper":
            defaults = {f.name: f.default for f in fields(self)}
            for name, value in PAPER_SIZES.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)

    @property
    def d_model(self) -> int:
        return 2 * self.lstm_hidden


class CrossmodalLayer(nn.Module):
    """One post-norm (crossmodal) transformer encoder layer, paper 000 eq. 2-3.

    ``x = LN(q + Attention(q, kv))``, ``O = LN(x + FFN(x))``. With ``kv`` from the other modality
    it is crossmodal; with ``kv = q`` an ordinary self-attention layer (base-nocross).
    ``confidence`` (B, Tq, Tk), when given, turns on the eq. 8-9 correction of the attention weights.
    """

    def __init__(self, d: int, n_heads: int, ffn_dim: int, dropout: float, correct: bool):
        super().__init__()
        self.attn = MultiHeadAttention(d, n_heads, dropout)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.ReLU(), Dropout(dropout), nn.Linear(ffn_dim, d))
        self.norm2 = nn.LayerNorm(d)
        self.dropout = Dropout(dropout)
        self.correct = nn.Linear(2, 1) if correct else None
        if self.correct is not None:
            nn.init.ones_(self.correct.weight)
            nn.init.zeros_(self.correct.bias)

    def forward(self, q: Tensor, kv: Tensor, q_mask: Tensor, kv_mask: Tensor, confidence=None) -> Tensor:
        correction = None
        if self.correct is not None and confidence is not None:
            w, b = self.correct.weight[0], self.correct.bias[0]
            c = confidence.unsqueeze(1)  # (B, 1, Tq, Tk), shared by the heads

            def correction(alpha: Tensor, scores: Tensor) -> Tensor:
                # eq. 8: s = Linear(alpha ⊕ c), elementwise over the attention matrix
                return alpha * w[0] + c * w[1] + b

        a, _ = self.attn(q, kv, kv_mask, q_mask, correction=correction)
        x = self.norm1(q + self.dropout(a))
        out = self.norm2(x + self.dropout(self.ffn(x)))
        return out * q_mask.unsqueeze(-1)  # keep padded steps at zero


def utterance_cmvn(x: Tensor, mask: Tensor) -> Tensor:
    """Normalise each utterance's valid frames to zero mean, unit variance per dimension."""
    m = mask.unsqueeze(-1)
    n = m.sum(1, keepdim=True).clamp(min=1.0)
    mean = (x * m).sum(1, keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum(1, keepdim=True) / n
    return (x - mean) / torch.sqrt(var + 1e-5) * m


class ConfidenceCorrection(nn.Module):
    """Self-attention weight correction, paper 000 eq. 6: ``s_k = LSTM(alpha_k ⊕ c_k)``.

    A forward LSTM over steps (trailing padding cannot reach real steps) followed by a Linear to
    one score per step; the caller applies the masked softmax of eq. 7.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, alpha: Tensor, cm: Tensor) -> Tensor:
        s, _ = self.lstm(torch.stack([alpha, cm], dim=-1))
        return self.out(s).squeeze(-1)


class CmtAwc(nn.Module):
    """Crossmodal transformer with attention weight correction; forward returns logits (B, classes)."""

    def __init__(self, config: CmtAwcConfig, n_classes: int, stats: dict | None = None):
        super().__init__()
        cfg = self.config = config
        stats = stats or {}
        d = cfg.d_model
        self.acoustic = cfg.acoustic  # input-name prefix of the acoustic stream
        self.norm_frames = InputNorm.from_stats(stats, cfg.acoustic, cfg.frames_dim)
        self.norm_words = InputNorm.from_stats(stats, "words", cfg.text_dim)
        self.blstm_a = MaskedBiLSTM(cfg.frames_dim, cfg.lstm_hidden)
        self.blstm_t = MaskedBiLSTM(cfg.text_dim, cfg.lstm_hidden)
        self.in_dropout = Dropout(cfg.dropout)
        sdpa = cfg.variant == "sdpa-correction"
        self.enc_a = nn.ModuleList(
            CrossmodalLayer(d, cfg.n_heads, cfg.ffn_dim, cfg.dropout, sdpa) for _ in range(cfg.n_layers)
        )
        self.enc_t = nn.ModuleList(
            CrossmodalLayer(d, cfg.n_heads, cfg.ffn_dim, cfg.dropout, sdpa) for _ in range(cfg.n_layers)
        )
        self.pool_a = AttentionPool(d, cfg.pool_hidden)
        self.pool_t = AttentionPool(d, cfg.pool_hidden)
        self.sa_t: ConfidenceCorrection | None = None
        self.sa_a: ConfidenceCorrection | None = None
        if cfg.variant == "sa-correction":
            self.sa_t = ConfidenceCorrection(cfg.sa_hidden)
            if cfg.sa_correct_audio:
                self.sa_a = ConfidenceCorrection(cfg.sa_hidden)
        self.classifier = nn.Sequential(
            Dropout(cfg.dropout),
            nn.Linear(2 * d, cfg.fc_hidden),
            nn.ReLU(),
            Dropout(cfg.dropout),
            nn.Linear(cfg.fc_hidden, n_classes),
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        v = self.config.variant
        frame_cm = v == "sdpa-correction" or (v == "sa-correction" and self.config.sa_correct_audio)
        word_cm = v in ("sa-correction", "sdpa-correction")
        a = self.config.acoustic
        names = [a] + ([f"{a}_cm"] if frame_cm else []) + [f"{a}_mask", "words"]
        return tuple(names + (["words_cm"] if word_cm else []) + ["words_mask"])

    def _subsample(self, x: Tensor, cm: Tensor | None, mask: Tensor):
        """Average ``frame_stride`` consecutive frames; a block is valid if its first frame is."""
        s = self.config.frame_stride
        if s == 1:
            return x, cm, mask
        # zero-pad T to a multiple of s; pooled blocks of real frames only see real frames plus
        # padding zeros at the very end, which the mask-weighted average ignores
        pad = (-x.shape[1]) % s
        x = nn.functional.pad(x * mask.unsqueeze(-1), (0, 0, 0, pad))
        m = nn.functional.pad(mask, (0, pad))
        B, D = x.shape[0], x.shape[2]
        msum = m.reshape(B, -1, s).sum(-1)
        xp = x.reshape(B, -1, s, D).sum(2) / msum.clamp(min=1.0).unsqueeze(-1)
        if cm is not None:
            cm = nn.functional.pad(cm * mask, (0, pad)).reshape(B, -1, s).sum(-1) / msum.clamp(min=1.0)
        return xp, cm, (msum > 0).to(mask.dtype)

    def forward(self, *inputs: Tensor) -> Tensor:
        x = dict(zip(self.input_names, inputs, strict=True))
        a = self.acoustic
        a_mask, t_mask = x[f"{a}_mask"], x["words_mask"]
        frames = self.norm_frames(x[a])
        if self.config.utterance_norm:
            frames = utterance_cmvn(frames, a_mask)
        frames, a_cm, a_mask = self._subsample(frames, x.get(f"{a}_cm"), a_mask)
        t_cm = x.get("words_cm")

        e = self.blstm_a(self.in_dropout(frames), a_mask)  # (B, T, d), eq. 1
        f = self.blstm_t(self.in_dropout(self.norm_words(x["words"])), t_mask)  # (B, W, d)

        conf_a = conf_t = None
        if self.config.variant == "sdpa-correction":
            assert a_cm is not None and t_cm is not None  # input_names has both CMs for this variant
            conf_a = a_cm.unsqueeze(2) * t_cm.unsqueeze(1)  # (B, T, W): frame CM ⊗ word CM
            conf_t = conf_a.transpose(1, 2)  # (B, W, T)

        cross = self.config.variant != "base-nocross"
        o_a, o_t = e, f
        for layer_a, layer_t in zip(self.enc_a, self.enc_t, strict=True):
            if cross:  # Q from the stream, K = V from the other modality's BLSTM output (eq. 2)
                o_a = layer_a(o_a, f, a_mask, t_mask, conf_a)
                o_t = layer_t(o_t, e, t_mask, a_mask, conf_t)
            else:  # Q, K, V from the same modality
                o_a = layer_a(o_a, o_a, a_mask, a_mask)
                o_t = layer_t(o_t, o_t, t_mask, t_mask)

        corr_a: Callable[[Tensor], Tensor] | None = None
        corr_t: Callable[[Tensor], Tensor] | None = None
        sa_a, sa_t = self.sa_a, self.sa_t
        if sa_t is not None:  # eq. 6-7 on the pooling weights

            def correct_t(alpha: Tensor) -> Tensor:
                return sa_t(alpha, t_cm)

            corr_t = correct_t

        if sa_a is not None:

            def correct_a(alpha: Tensor) -> Tensor:
                return sa_a(alpha, a_cm)

            corr_a = correct_a

        z_a, _ = self.pool_a(o_a, a_mask, corr_a)  # eq. 4-5
        z_t, _ = self.pool_t(o_t, t_mask, corr_t)
        return self.classifier(torch.cat([z_a, z_t], dim=-1))
