"""ADF: attention driven fusion of a SincNet audio network and a two-branch text network (seed 003).

Audio (paper §2.1): SincNet band-pass layer (eq. 1-2) on the raw 16-kHz waveform, then a DCNN
(Conv1D, max pooling, BatchNorm, LeakyReLU) and dense layers, giving one vector per 250-ms chunk.
Training takes random 250-ms chunks (``train_chunks`` per utterance per step); evaluation slides a
250-ms window with a 10-ms shift over the valid samples; the chunk vectors are averaged.

Exact and cheap sliding evaluation: every trunk layer is shift-invariant (valid convolutions,
non-overlapping max pooling, BatchNorm in eval mode and activations are per position), and the
sinc stride times the pooling factors is D, a divisor of the 160-sample shift, so the sampling grid
of a chunk starting at a multiple of 160 samples coincides with that of the whole waveform. The trunk therefore
runs ONCE over the whole waveform, and the first chunk-level dense layer (flatten -> Linear) is a
Conv1d whose kernel is the per-chunk trunk length and whose stride is 160 / D: its k-th output is
exactly the dense layer applied to chunk k (``test_models_camser_adf`` checks it against running
``app.analysis.features.waveform_chunks`` chunk by chunk). The later dense layers are 1x1 convolutions.
For 3.5 s (326 chunks) the default preset needs ~0.25 GMAC instead of ~3.1 GMAC chunk by chunk.
The default preset computes the sinc layer at stride 2 (every other output sample, half the cost;
the following |.| + max pooling is an envelope detector, so little is lost); "paper" uses stride 1.

Waveform normalisation: each utterance is divided by the PEAK absolute value of its valid samples
(the paper's "amplitude normalization", as in SincNet's data preparation); ``wave_norm="rms"``
divides by the valid-sample RMS instead. Audio shorter than 250 ms is zero-padded to one chunk.

Text (paper §2.2): word vectors (input-embedding vectors stand in for GloVe, SPEC §2) go to
(a) BiLSTM -> Conv1D with filter sizes 1, 3, 5 and (b) Conv1D with filter sizes 1, 3, 5. Cross
attention (eq. 3-4): for each size j, ``alpha_i = softmax_i(b_ij . a_ij)``, ``H_j = sum_i alpha_i a_ij``.
``[H_1; H_3; H_5; max_i b_i1; max_i b_i3; max_i b_i5]`` -> DNN -> text vector.

Fusion (paper §2.3), ``fusion``:
* "F-I": concatenation ``[a; t]`` -> classifier;
* "F-II": self-attention after concatenation: ``[a; t]`` is cut into segments of ``fusion_seg``
  values (the "informative segments in the feature vectors"), one scaled dot-product self-attention
  layer with a residual runs over the segments, the result is flattened -> classifier;
* "F-III" (default, best in the paper): attention before fusion, eq. 5-7 over the two modality
  vectors, each first projected to ``fusion_dim``: ``h_m = tanh(W_h c_m + b_h)``,
  ``beta_m = softmax_m(h_m . h_hat)`` with a learned context vector ``h_hat``,
  ``q = sum_m beta_m c_m`` -> classifier.
``modality="audio"`` / ``"text"`` are the single-modality networks (vector -> classifier).

Acoustic front end (``acoustic``, not a paper variant): ``"waveform"`` (default, the paper's
SincNet + DCNN on raw samples, §2.1) or ``"encoder"``: pretrained Whisper encoder frames (``encoder``,
384-d at 20 ms, from the same ASR pass; SPEC §2) replace the SincNet layer and the convolutional
trunk. What changes is the INPUT of the chunk-level dense layers (the DCNN output of §2.1 that
feeds eq. 5's audio vector ``c_a``): a Conv1d whose kernel spans one 240-ms chunk of standardised
encoder frames (12 frames; 250 ms is not a whole number of 20-ms frames) at a 20-ms shift gives one
vector per chunk, then the same 1x1 dense layers, and the chunk vectors are averaged over the
utterance as in the paper. Training uses every chunk (no random chunks: the frames are cheap).
Text network and fusion (eq. 3-7) are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.layers import NEG, InputNorm, MaskedBiLSTM, masked_softmax

FUSIONS = ("F-I", "F-II", "F-III")
MODALITIES = ("both", "audio", "text")
ACOUSTIC = ("waveform", "encoder")
ENCODER_CHUNK_FRAMES = 12  # 240 ms of 20-ms Whisper encoder frames

# Sizes that the presets fill in (fields left at None). "paper": SincNet's usual layer sizes
# (80 filters of 251 taps, 60-channel convolutions of width 5, three 2048-d dense layers; the paper
# states only the 2048-d audio vector), 12 text filters (Fig. 1), a 4800-d text vector. Values the
# paper does not give (LSTM width, fusion sizes) are assumptions. sinc_stride * prod(pools) must
# divide the 160-sample shift: SincNet's pools (3, 3, 3) become (4, 4, 5). "default": narrower and
# shorter sinc filters at stride 2, 256-d audio and 128-d text vectors, sized for CPU training
# (one epoch of ~650 utterances in ~5 s, one 3.5-s utterance in ~15 ms on one core).
PRESETS = {
    "default": dict(
        sinc_filters=32,
        sinc_kernel=101,
        sinc_stride=2,
        conv_channels=(32, 32),
        pools=(4, 4, 5),
        audio_dense=(256, 256),
        text_lstm=64,
        text_filters=32,
        text_dense=(128,),
        fusion_seg=32,
        fusion_dim=128,
        fusion_hidden=128,
    ),
    "paper": dict(
        sinc_filters=80,
        sinc_kernel=251,
        sinc_stride=1,
        conv_channels=(60, 60),
        pools=(4, 4, 5),
        audio_dense=(2048, 2048, 2048),
        text_lstm=128,
        text_filters=12,
        text_dense=(4800,),
        fusion_seg=64,
        fusion_dim=1024,
        fusion_hidden=512,
    ),
}

# The paper: Adam lr 1e-3, batch 64 (kept). Epochs sized for the CPU budget (~7 s per epoch).
# (6-fold CV on RAVDESS: lr 1e-3 47.5%, lr 3e-3 with 40 epochs 44.2% balanced accuracy)
TRAIN_DEFAULTS = dict(lr=1e-3, weight_decay=1e-4, batch_size=64, epochs=20, patience=5)


@dataclass
class AdfConfig:
    """Configuration; ``preset`` fills every size left at None ("default" for CPU, "paper")."""

    preset: str = "default"
    fusion: str = "F-III"
    modality: str = "both"
    # "waveform" (paper: SincNet on raw samples) or "encoder" (Whisper encoder frames; docstring)
    acoustic: str = "waveform"
    enc_dim: int = 384
    # audio
    sample_rate: int = 16000
    chunk_s: float = 0.25
    shift_s: float = 0.010  # evaluation shift; a multiple of prod(pools) samples (exactness)
    wave_norm: str = "peak"  # "peak" (paper / SincNet) or "rms"
    train_chunks: int = 2  # random chunks per utterance per training step (cost ~ linear in it)
    sinc_filters: int | None = None
    sinc_kernel: int | None = None
    sinc_stride: int | None = None  # output every n-th sample of the sinc layer (cost / n)
    sinc_min_low_hz: float = 50.0
    sinc_min_band_hz: float = 50.0
    conv_channels: tuple[int, ...] | None = None
    conv_kernel: int = 5
    pools: tuple[int, ...] | None = None  # sinc layer, then one per conv layer
    audio_dense: tuple[int, ...] | None = None
    # text
    word_dim: int = 384
    text_lstm: int | None = None
    text_filters: int | None = None
    text_kernels: tuple[int, ...] = (1, 3, 5)
    text_dense: tuple[int, ...] | None = None
    # fusion
    fusion_seg: int | None = None  # F-II segment size
    fusion_dim: int | None = None  # F-III common size of the two modality vectors
    fusion_hidden: int | None = None
    dropout: float = 0.2

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("conv_channels", "pools", "audio_dense", "text_kernels", "text_dense"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}")
        if self.acoustic not in ACOUSTIC:
            raise ValueError(f"acoustic must be one of {ACOUSTIC}")
        if self.wave_norm not in ("peak", "rms"):
            raise ValueError("wave_norm must be 'peak' or 'rms'")
        if len(self.pools) != len(self.conv_channels) + 1:
            raise ValueError("pools needs one factor for the sinc layer and one per conv layer")
        if self.shift_samples % self.downsample:
            raise ValueError(
                f"shift {self.shift_samples} samples is not a multiple of sinc_stride * prod(pools) = "
                f"{self.downsample}: the sliding evaluation would not be exact"
            )
        if self.sinc_kernel % 2 == 0:
            raise ValueError("sinc_kernel must be odd (symmetric filters)")
        if any(k % 2 == 0 for k in self.text_kernels):
            raise ValueError("text_kernels must be odd ('same' padding)")
        if self.fusion == "F-II" and self.modality == "both":
            for dim in (self.audio_dense[-1], self.text_dense[-1]):
                if dim % self.fusion_seg:
                    raise ValueError(f"F-II: vector size {dim} is not a multiple of fusion_seg")

    @property
    def chunk_samples(self) -> int:
        return int(round(self.chunk_s * self.sample_rate))

    @property
    def shift_samples(self) -> int:
        return int(round(self.shift_s * self.sample_rate))

    @property
    def downsample(self) -> int:
        """Samples per trunk output step: sinc stride times the pooling factors."""
        assert self.sinc_stride is not None and self.pools is not None  # filled by __post_init__
        return self.sinc_stride * int(np.prod(self.pools))


# ----------------------------------------------------------------------------------------------
# Audio network
# ----------------------------------------------------------------------------------------------


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


class SincConv(nn.Module):
    """SincNet band-pass filters (eq. 1-2; Ravanelli & Bengio 2018), valid convolution.

    Filter m: ``g[n] = 2 f2 sinc(2 pi f2 n) - 2 f1 sinc(2 pi f1 n)`` with learnable cut-offs
    ``f1 = min_low + |low_m|`` and ``f2 = min(f1 + min_band + |band_m|, fs / 2)``, times a Hamming
    window, divided by ``2 (f2 - f1)`` so each filter has unit pass-band gain. Cut-offs start
    mel-spaced. The filters depend only on parameters: ONNX export folds them into a constant.
    """

    t2pi: Tensor  # buffers: (1, K // 2) left halves of 2 pi t and of the window, and mirrored copies
    window: Tensor
    t2pi_r: Tensor
    window_r: Tensor

    def __init__(
        self,
        n_filters: int,
        kernel_size: int,
        sample_rate: int,
        min_low_hz: float,
        min_band_hz: float,
        stride: int = 1,
    ):
        super().__init__()
        self.kernel_size, self.sample_rate, self.stride = kernel_size, sample_rate, stride
        self.min_low_hz, self.min_band_hz = min_low_hz, min_band_hz
        high = sample_rate / 2 - (min_low_hz + min_band_hz)
        hz = _mel_to_hz(np.linspace(_hz_to_mel(30.0), _hz_to_mel(high), n_filters + 1))
        self.low_hz_ = nn.Parameter(torch.tensor(hz[:-1] - min_low_hz, dtype=torch.float32).view(-1, 1))
        self.band_hz_ = nn.Parameter(torch.tensor(np.diff(hz), dtype=torch.float32).view(-1, 1))
        half = kernel_size // 2
        n = torch.arange(-half, 0, dtype=torch.float32)  # left half, in samples
        # time in seconds times 2 pi, and the left half of a Hamming window
        self.register_buffer("t2pi", 2 * math.pi * n.view(1, -1) / sample_rate, persistent=False)
        window = 0.54 - 0.46 * torch.cos(
            2 * math.pi * torch.arange(half, dtype=torch.float32) / (kernel_size - 1)
        )
        self.register_buffer("window", window.view(1, -1), persistent=False)
        # mirrored copies: the right half without torch.flip, which ONNX constant folding skips
        self.register_buffer("t2pi_r", torch.flip(self.t2pi, dims=[1]), persistent=False)
        self.register_buffer("window_r", torch.flip(self.window, dims=[1]), persistent=False)

    def filters(self) -> Tensor:
        low = self.min_low_hz + torch.abs(self.low_hz_)
        high = torch.clamp(
            low + self.min_band_hz + torch.abs(self.band_hz_), self.min_low_hz, self.sample_rate / 2
        )
        band = high - low

        def half(t2pi: Tensor, window: Tensor) -> Tensor:
            # 2 f sinc(2 pi f t) = sin(2 pi f t) / (pi t), with t2pi = 2 pi t (t != 0)
            return (torch.sin(high * t2pi) - torch.sin(low * t2pi)) / (t2pi / 2) * window

        centre = 2 * band  # the limit at t = 0
        kernel = torch.cat([half(self.t2pi, self.window), centre, half(self.t2pi_r, self.window_r)], dim=1)
        kernel = kernel / (2 * band)
        return kernel.unsqueeze(1)  # (n_filters, 1, K)

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, L) -> (N, F, (L - K) // stride + 1)
        return F.conv1d(x, self.filters(), stride=self.stride)


class SincTrunk(nn.Module):
    """Shift-invariant part of the audio DCNN: sinc layer and conv layers, each followed by
    non-overlapping max pooling, BatchNorm and LeakyReLU (SincNet's order; |.| after the sinc layer).
    """

    def __init__(self, cfg: AdfConfig):
        super().__init__()
        # all filled by AdfConfig.__post_init__
        assert cfg.sinc_filters is not None and cfg.sinc_kernel is not None and cfg.sinc_stride is not None
        assert cfg.pools is not None and cfg.conv_channels is not None
        self.sinc = SincConv(
            cfg.sinc_filters,
            cfg.sinc_kernel,
            cfg.sample_rate,
            cfg.sinc_min_low_hz,
            cfg.sinc_min_band_hz,
            cfg.sinc_stride,
        )
        self.pools = cfg.pools
        chans = (cfg.sinc_filters,) + cfg.conv_channels
        self.convs = nn.ModuleList(
            nn.Conv1d(cin, cout, cfg.conv_kernel) for cin, cout in zip(chans[:-1], chans[1:], strict=True)
        )
        self.norms = nn.ModuleList(nn.BatchNorm1d(c) for c in chans)
        self.act = nn.LeakyReLU(0.2)
        self.out_channels = chans[-1]
        # trunk output length of one chunk = kernel of the chunk-level dense layer
        length = ((cfg.chunk_samples - cfg.sinc_kernel) // cfg.sinc_stride + 1) // cfg.pools[0]
        for p in cfg.pools[1:]:
            length = (length - cfg.conv_kernel + 1) // p
        if length < 1:
            raise ValueError("chunk too short for this trunk")
        self.chunk_length = length
        self.downsample = cfg.downsample

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, L) -> (N, C, ~L / D)
        y = torch.abs(self.sinc(x))
        y = self.act(self.norms[0](F.max_pool1d(y, self.pools[0])))
        for conv, norm, p in zip(self.convs, self.norms[1:], self.pools[1:], strict=True):
            y = self.act(norm(F.max_pool1d(conv(y), p)))
        return y


class AudioNet(nn.Module):
    """SincNet + DCNN -> one vector per 250-ms chunk, averaged over the utterance's chunks."""

    def __init__(self, cfg: AdfConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = SincTrunk(cfg)
        stride = cfg.shift_samples // self.trunk.downsample
        dims = cfg.audio_dense
        assert dims is not None  # filled by AdfConfig.__post_init__
        # flatten -> Linear over one chunk == Conv1d(kernel = chunk length) at one position;
        # with stride = shift / D over the whole waveform it visits every chunk exactly.
        self.dense = nn.ModuleList(
            [nn.Conv1d(self.trunk.out_channels, dims[0], self.trunk.chunk_length, stride=stride)]
            + [nn.Conv1d(a, b, 1) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        self.dense_norms = nn.ModuleList(nn.BatchNorm1d(d) for d in dims)
        self.act = nn.LeakyReLU(0.2)
        self.drop = nn.Dropout(cfg.dropout)
        self.out_dim = dims[-1]

    def _dense(self, y: Tensor) -> Tensor:  # (N, C, T) -> (N, H, K)
        for i, (lin, norm) in enumerate(zip(self.dense, self.dense_norms, strict=True)):
            y = self.act(norm(lin(self.drop(y) if i else y)))
        return y

    def normalise(self, wave: Tensor, mask: Tensor) -> Tensor:
        """Zero the padding and scale by the valid samples' peak (or RMS)."""
        x = wave * mask
        if self.cfg.wave_norm == "peak":
            scale = x.abs().amax(dim=1, keepdim=True)
        else:
            scale = torch.sqrt(
                (x * x).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
            )
        return x / scale.clamp(min=1e-6)

    def embed_chunks(self, chunks: Tensor) -> Tensor:
        """(N, chunk) normalised chunks -> (N, H): the per-chunk computation, used in training."""
        return self._dense(self.trunk(chunks.unsqueeze(1))).squeeze(-1)

    def embed_sliding(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, L) normalised waveform -> (B, H): mean over every chunk at the evaluation shift.

        The same numbers as ``embed_chunks`` on ``app.analysis.features.waveform_chunks(audio)`` averaged,
        with the trunk computed once. The right pad of one chunk of zeros makes audio shorter than
        a chunk one zero-padded chunk; chunks reaching past the valid samples are masked out.
        """
        cfg = self.cfg
        x = F.pad(x, (0, cfg.chunk_samples))
        y = self._dense(self.trunk(x.unsqueeze(1)))  # (B, H, K); output k = chunk at k * shift
        k = torch.cumsum(torch.ones_like(y[:, 0, :]), dim=1) - 1.0  # 0..K-1, keeps K dynamic
        n_valid = mask.sum(dim=1, keepdim=True).clamp(min=float(cfg.chunk_samples))
        chunk_mask = (k * cfg.shift_samples + cfg.chunk_samples <= n_valid).to(y.dtype)
        return (y * chunk_mask.unsqueeze(1)).sum(dim=-1) / chunk_mask.sum(dim=1, keepdim=True)

    def random_chunks(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, L) -> (B, train_chunks, chunk): random 250-ms chunks inside each valid region."""
        cfg = self.cfg
        n = cfg.chunk_samples
        x = F.pad(x, (0, n))
        max_start = (mask.sum(dim=1) - n).clamp(min=0.0)  # (B,)
        u = torch.rand(x.shape[0], cfg.train_chunks, device=x.device)
        starts = torch.floor(u * (max_start.unsqueeze(1) + 1.0)).long()
        idx = starts.unsqueeze(-1) + torch.arange(n, device=x.device)
        return torch.gather(x.unsqueeze(1).expand(-1, cfg.train_chunks, -1), 2, idx)

    def forward(self, wave: Tensor, mask: Tensor) -> Tensor:
        x = self.normalise(wave, mask)
        if self.training:
            chunks = self.random_chunks(x, mask)
            b, k, n = chunks.shape
            return self.embed_chunks(chunks.reshape(b * k, n)).reshape(b, k, -1).mean(dim=1)
        return self.embed_sliding(x, mask)


class EncoderAudioNet(nn.Module):
    """``acoustic="encoder"``: Whisper encoder frames -> one vector per 240-ms chunk (20-ms shift),
    averaged over the utterance's chunks (module docstring)."""

    def __init__(self, cfg: AdfConfig, stats: dict):
        super().__init__()
        dims = cfg.audio_dense
        assert dims is not None  # filled by AdfConfig.__post_init__
        self.norm = InputNorm.from_stats(stats, "encoder", cfg.enc_dim)
        self.kernel = ENCODER_CHUNK_FRAMES
        self.dense = nn.ModuleList(
            [nn.Conv1d(cfg.enc_dim, dims[0], self.kernel)]
            + [nn.Conv1d(a, b, 1) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        self.dense_norms = nn.ModuleList(nn.BatchNorm1d(d) for d in dims)
        self.act = nn.LeakyReLU(0.2)
        self.drop = nn.Dropout(cfg.dropout)
        self.out_dim = dims[-1]

    def forward(self, frames: Tensor, mask: Tensor) -> Tensor:  # (B, T, E), (B, T) -> (B, H)
        x = self.norm(frames) * mask.unsqueeze(-1)  # padding stays zero after standardising
        y = F.pad(x.transpose(1, 2), (0, self.kernel - 1))  # a short utterance still gives one chunk
        for i, (lin, norm) in enumerate(zip(self.dense, self.dense_norms, strict=True)):
            y = self.act(norm(lin(self.drop(y) if i else y)))
        k = torch.cumsum(torch.ones_like(y[:, 0, :]), dim=1) - 1.0  # chunk k covers frames k..k+11
        n_valid = mask.sum(dim=1, keepdim=True).clamp(min=float(self.kernel))
        chunk_mask = (k + self.kernel <= n_valid).to(y.dtype)
        return (y * chunk_mask.unsqueeze(1)).sum(dim=-1) / chunk_mask.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Text network
# ----------------------------------------------------------------------------------------------


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max over valid steps of (B, T, D); zeros for an all-padding row."""
    m = mask.unsqueeze(-1)
    best = x.masked_fill(m == 0, NEG).amax(dim=1)
    return best * (mask.sum(dim=1, keepdim=True) > 0).to(x.dtype)


class TextNet(nn.Module):
    """Two branches over word vectors with n-gram cross attention (eq. 3-4), then a DNN."""

    def __init__(self, cfg: AdfConfig, stats: dict):
        super().__init__()
        # all filled by AdfConfig.__post_init__
        assert cfg.text_lstm is not None and cfg.text_filters is not None and cfg.text_dense is not None
        self.norm = InputNorm.from_stats(stats, "words_static", cfg.word_dim)
        self.lstm = MaskedBiLSTM(cfg.word_dim, cfg.text_lstm)
        f = cfg.text_filters
        # 'same' padding; inputs are zeroed at padded words, so the last real word sees zeros on
        # its right whether the sample is alone or padded in a batch.
        self.conv_a = nn.ModuleList(
            nn.Conv1d(2 * cfg.text_lstm, f, k, padding=k // 2) for k in cfg.text_kernels
        )
        self.conv_b = nn.ModuleList(nn.Conv1d(cfg.word_dim, f, k, padding=k // 2) for k in cfg.text_kernels)
        dims = (2 * f * len(cfg.text_kernels),) + cfg.text_dense
        layers = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Dropout(cfg.dropout), nn.Linear(a, b), nn.ReLU()]
        self.dnn = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    @staticmethod
    def _conv(conv: nn.Module, x: Tensor, m: Tensor) -> Tensor:  # (B, T, D) -> (B, T, F)
        return F.relu(conv(x.transpose(1, 2))).transpose(1, 2) * m

    def forward(self, words: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1)
        x = self.norm(words) * m
        h = self.lstm(x, mask)  # zero at padded words
        pooled, maxed = [], []
        for conv_a, conv_b in zip(self.conv_a, self.conv_b, strict=True):
            a = self._conv(conv_a, h, m)  # left branch, size j
            b = self._conv(conv_b, x, m)  # right branch, size j
            alpha = masked_softmax((a * b).sum(dim=-1), mask, dim=1)  # eq. 3
            pooled.append(torch.sum(alpha.unsqueeze(-1) * a, dim=1))  # eq. 4
            maxed.append(_masked_max(b, mask))
        return self.dnn(torch.cat(pooled + maxed, dim=-1))


# ----------------------------------------------------------------------------------------------
# Fusion and the full model
# ----------------------------------------------------------------------------------------------


class SegmentSelfAttention(nn.Module):
    """F-II: self-attention over fixed-size segments of the concatenated vector, with a residual."""

    def __init__(self, seg: int, dropout: float):
        super().__init__()
        self.seg = seg
        self.q, self.k, self.v = nn.Linear(seg, seg), nn.Linear(seg, seg), nn.Linear(seg, seg)
        self.norm = nn.LayerNorm(seg)
        self.drop = nn.Dropout(dropout)

    def forward(self, c: Tensor) -> Tensor:  # (B, D) -> (B, D)
        s = c.reshape(c.shape[0], -1, self.seg)  # (B, D / seg, seg)
        scores = torch.matmul(self.q(s), self.k(s).transpose(1, 2)) / math.sqrt(self.seg)
        ctx = torch.matmul(self.drop(torch.softmax(scores, dim=-1)), self.v(s))
        return self.norm(s + ctx).flatten(1)


class ModalityAttention(nn.Module):
    """F-III, eq. 5-7: ``h_m = tanh(W_h c_m + b_h)``, ``beta_m = softmax(h_m . h_hat)``, ``q = sum beta_m c_m``."""

    def __init__(self, dims: tuple[int, ...], d: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(n, d) for n in dims)
        self.w_h = nn.Linear(d, d)
        self.context = nn.Parameter(torch.randn(d) / math.sqrt(d))  # h_hat, learned

    def forward(self, *vectors: Tensor) -> Tensor:
        c = torch.stack([p(v) for p, v in zip(self.proj, vectors, strict=True)], dim=1)  # (B, M, d)
        beta = torch.softmax(torch.tanh(self.w_h(c)) @ self.context, dim=1)  # (B, M)
        return torch.sum(beta.unsqueeze(-1) * c, dim=1)


class Adf(nn.Module):
    """ADF (seed 003). ``forward(*inputs)`` takes ``input_names`` in order; returns (B, classes)."""

    def __init__(self, cfg: AdfConfig, n_classes: int, stats: dict | None = None):
        super().__init__()
        stats = stats or {}
        self.cfg = cfg
        self.audio: AudioNet | EncoderAudioNet | None = None
        if cfg.modality in ("both", "audio"):
            self.audio = EncoderAudioNet(cfg, stats) if cfg.acoustic == "encoder" else AudioNet(cfg)
        self.text = TextNet(cfg, stats) if cfg.modality in ("both", "text") else None
        self.fuse: ModalityAttention | SegmentSelfAttention | None = None
        # all filled by AdfConfig.__post_init__
        assert cfg.fusion_dim is not None and cfg.fusion_seg is not None and cfg.fusion_hidden is not None
        if cfg.modality == "audio":
            assert self.audio is not None
            d_in = self.audio.out_dim
        elif cfg.modality == "text":
            assert self.text is not None
            d_in = self.text.out_dim
        else:  # both
            assert self.audio is not None and self.text is not None
            if cfg.fusion == "F-III":
                self.fuse = ModalityAttention((self.audio.out_dim, self.text.out_dim), cfg.fusion_dim)
                d_in = cfg.fusion_dim
            else:
                d_in = self.audio.out_dim + self.text.out_dim
                if cfg.fusion == "F-II":
                    self.fuse = SegmentSelfAttention(cfg.fusion_seg, cfg.dropout)
        self.classifier = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(d_in, cfg.fusion_hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.fusion_hidden, n_classes),
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        names: tuple[str, ...] = ()
        if self.audio is not None:
            names += (
                ("encoder", "encoder_mask")
                if self.cfg.acoustic == "encoder"
                else ("waveform", "waveform_mask")
            )
        if self.text is not None:
            names += ("words_static", "words_mask")
        return names

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"Adf expects {self.input_names}, got {len(inputs)} tensors")
        x = dict(zip(self.input_names, inputs, strict=True))
        vecs = []
        if isinstance(self.audio, EncoderAudioNet):
            vecs.append(self.audio(x["encoder"], x["encoder_mask"]))
        elif self.audio is not None:
            vecs.append(self.audio(x["waveform"], x["waveform_mask"]))
        if self.text is not None:
            vecs.append(self.text(x["words_static"], x["words_mask"]))
        if isinstance(self.fuse, ModalityAttention):
            z = self.fuse(*vecs)
        else:
            z = torch.cat(vecs, dim=-1)
            if self.fuse is not None:
                z = self.fuse(z)
        return self.classifier(z)
