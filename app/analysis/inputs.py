"""Named model inputs: one registry, one Analysis -> a dict of arrays, several -> one padded batch.

Every model's ONNX graph names the inputs it reads from this one vocabulary, so the engine only
has to feed ``session.get_inputs()`` from the batch, and training builds its tensors with the very
same functions. ``INPUTS`` is the single source of what an input is: its axes, its mask, which
inputs training standardises and augments, and the function that produces it. Export's dynamic axes
(``training.export``), training's row masks and statistics (``training.trainer``), augmentation
(``training.augment``) and the tests' dummy models (``tests/serving_helpers.py``) derive from it.

Arrays are per utterance without a batch axis; ``collate`` pads the first axis with zeros (masks are
1.0 for real steps, 0.0 for padding). ``model_inputs(analysis, names)`` computes only the inputs
asked for, and only the acoustic features those need (``features.AcousticStages``); ``inputs_for``
says which names a set of models needs.

The table below is ``table()`` (a test keeps them equal). Shapes: the first axis is the
variable-length sequence axis, named as in the ONNX graphs; a named last axis is a width that
depends on the configured part (``text_dim``: text encoder, ``word_dim``: GloVe or the text encoder's
input embeddings, ``enc_dim``: Whisper encoder or wav2vec2).

| name           | shape                     | mask          | what                                                |
|----------------|---------------------------|---------------|-----------------------------------------------------|
| frames33       | (frames, 33)              | frames33_mask | MFCC-20, CQT-12, F0 at 10 ms (cmt-awc)              |
| frames33_cm    | (frames,)                 | frames33_mask | confidence of the word covering each 10-ms frame    |
| frames33_mask  | (frames,)                 |               | 1 per 10-ms frame                                   |
| words          | (words, text_dim)         | words_mask    | contextual vector per ASR word (cmt-awc, 3m-ser)    |
| words_static   | (words, word_dim)         | words_mask    | static vector per word (adf): GloVe or substitute + |
| words_cm       | (words,)                  | words_mask    | ASR confidence per word                             |
| words_mask     | (words,)                  |               | 1 per word (one for an empty transcript)            |
| mfcc_seg       | (segments, 300, 40)       | seg_mask      | HTK MFCC-40 per 3-s segment (ca-mser)               |
| spec_seg       | (segments, 300, 200)      | seg_mask      | linear spectrogram per 3-s segment (ca-mser)        |
| enc_seg        | (segments, 150, enc_dim)  | seg_mask      | wav2vec2 or Whisper frames per 3-s segment +        |
| seg_mask       | (segments,)               |               | 1 per 3-s segment                                   |
| waveform       | (samples,)                | waveform_mask | raw 16-kHz samples (adf; chunked inside the graph)  |
| waveform_mask  | (samples,)                |               | 1 per sample                                        |
| enc_patches    | (patches, enc_dim)        | patch_mask    | Whisper encoder frames mean-pooled per 0.96 s       |
| logmel_patches | (logmel_patches, 96, 64)  | patch_mask    | VGGish log-mel patches (3m-ser audio="vggish")      |
| patch_mask     | (patches,)                |               | 1 per 0.96-s patch (both patch kinds)               |
| encoder        | (encoder_frames, enc_dim) | encoder_mask  | Whisper encoder frames at 20 ms                     |
| encoder_cm     | (encoder_frames,)         | encoder_mask  | confidence of the word covering each 20-ms frame    |
| encoder_mask   | (encoder_frames,)         |               | 1 per encoder frame                                 |

+ Pretrained parts (SPEC §2): ``words_static`` holds ``Analysis.word_vectors`` (a local GloVe file,
``app.analysis.word_vectors``) when the analyzer has one, else the text encoder's input-embedding vectors
(the GloVe substitute); ``enc_seg`` holds ``Analysis.speech_frames`` (wav2vec2 run on each 3-s
segment, ``app.analysis.speech_encoder``) when the analyzer has a speech encoder, else the Whisper encoder
frames cut into 3-s segments.

``logmel_patches`` keeps an axis name of its own ("logmel_patches", not "patches") because shipped
graphs were exported with it; its length still equals ``patch_mask``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from app.analysis import features as F

SEGMENT_FRAMES = 300  # 3 s at 10 ms
SEGMENT_ENC_FRAMES = 150  # 3 s at 50 frames/s
SEGMENT_S = 3.0
ENCODER_HOP_S = 0.02  # Whisper encoder frames: 50 per second
PATCH_ENC_FRAMES = 48  # 0.96 s at 50 frames/s (one VGGish patch)


# ---------------------------------------------------------------------------------------------
# Per-call sources: the analysis plus the intermediate results several inputs share
# ---------------------------------------------------------------------------------------------


class Sources:
    """One analysed utterance and the intermediate results its inputs share, each computed on first
    use and at most once per ``model_inputs`` call.

    Why a per-call object: producers stay pure functions of it, while the acoustic stages (framing,
    the 25-ms FFT) and small counts are shared between the inputs of one call without being kept on
    the ``Analysis``. ``analysis.acoustic``, when an older caller filled it, is used as is.
    """

    def __init__(self, analysis, max_words: int = 100, encoder_shift: np.ndarray | None = None):
        self.analysis = analysis
        self.max_words = max_words
        self.encoder_shift = encoder_shift

    @cached_property
    def acoustic(self) -> F.AcousticFeatures | F.AcousticStages:
        """Acoustic features: the analysis's own when present, else computed from its audio on demand."""
        given = getattr(self.analysis, "acoustic", None)
        return given if given is not None else F.AcousticStages(self.analysis.audio)

    @cached_property
    def n_frames(self) -> int:
        """10-ms frame count (``features.n_frames``), known without computing any feature."""
        given = getattr(self.analysis, "acoustic", None)
        return given.frames33.shape[0] if given is not None else F.n_frames(len(self.analysis.audio))

    @cached_property
    def n_words(self) -> int:
        return min(len(self.analysis.text), self.max_words)

    @cached_property
    def n_segments(self) -> int:
        """3-s segments, the last one partial; at least one."""
        return max(1, math.ceil(len(self.analysis.audio) / (F.SAMPLE_RATE * SEGMENT_S)))

    @cached_property
    def n_patches(self) -> int:
        """0.96-s patches on the VGGish grid (``features.n_patches``), shared by both patch inputs."""
        return F.n_patches(self.n_frames)

    @cached_property
    def encoder(self) -> np.ndarray:
        """(Te, E) Whisper encoder frames as float32, plus ``encoder_shift`` when given (per-session
        adaptation, ``app.analysis.adaptation``): added here, before any input pools, cuts or pads
        the frames, so every Whisper-frame input sees the same shifted frames."""
        frames = self.analysis.transcript.encoder_frames.astype(np.float32, copy=False)
        if self.encoder_shift is None:
            return frames
        shift = np.asarray(self.encoder_shift, np.float32).reshape(-1)
        if shift.shape != frames.shape[1:]:
            raise ValueError(f"encoder shift has {shift.size} values, the encoder frames {frames.shape[1]}")
        return frames + shift


# ---------------------------------------------------------------------------------------------
# Producers: pure functions Sources -> one input's array
# ---------------------------------------------------------------------------------------------


def _ones(n: int) -> np.ndarray:
    return np.ones(n, np.float32)


def _segments(x: np.ndarray, length: int, n_seg: int) -> np.ndarray:
    """(T, D) -> (n_seg, length, D): consecutive 3-s segments, the last one zero-padded."""
    out = np.zeros((n_seg, length) + x.shape[1:], np.float32)
    flat = out.reshape(n_seg * length, *x.shape[1:])
    n = min(len(x), n_seg * length)
    flat[:n] = x[:n]
    return out


def _pool(x: np.ndarray, size: int, n: int) -> np.ndarray:
    """Mean-pool ``n`` consecutive blocks of ``size`` frames (a short last block is averaged as is)."""
    out = np.zeros((n, x.shape[1]), np.float32)
    for i in range(n):
        block = x[i * size : (i + 1) * size]
        if len(block):
            out[i] = block.mean(axis=0)
    return out


def _frames33(s: Sources) -> np.ndarray:
    return s.acoustic.frames33


def _frames33_cm(s: Sources) -> np.ndarray:
    return F.frame_confidence(s.analysis.transcript.words, s.n_frames)


def _frames33_mask(s: Sources) -> np.ndarray:
    return _ones(s.n_frames)


def _words(s: Sources) -> np.ndarray:
    return s.analysis.text.contextual[: s.n_words]


def _words_static(s: Sources) -> np.ndarray:
    """GloVe vectors when the analyzer has them, else the text encoder's static vectors."""
    vectors = getattr(s.analysis, "word_vectors", None)
    return (s.analysis.text.static if vectors is None else vectors)[: s.n_words]


def _words_cm(s: Sources) -> np.ndarray:
    return s.analysis.text.confidence[: s.n_words]


def _words_mask(s: Sources) -> np.ndarray:
    return _ones(s.n_words)


def _mfcc_seg(s: Sources) -> np.ndarray:
    return _segments(s.acoustic.mfcc40, SEGMENT_FRAMES, s.n_segments)


def _spec_seg(s: Sources) -> np.ndarray:
    return _segments(s.acoustic.spectrogram, SEGMENT_FRAMES, s.n_segments)


def _enc_seg(s: Sources) -> np.ndarray:
    """(n_seg, 150, E): the speech encoder's own per-segment frames when it ran, else the Whisper
    encoder frames cut into 3-s segments."""
    frames = getattr(s.analysis, "speech_frames", None)
    if frames is None:
        return _segments(s.encoder, SEGMENT_ENC_FRAMES, s.n_segments)
    if frames.shape[:2] != (s.n_segments, SEGMENT_ENC_FRAMES):
        raise ValueError(
            f"speech frames {frames.shape} do not match {s.n_segments} segments of {SEGMENT_ENC_FRAMES}"
        )
    return frames.astype(np.float32, copy=False)


def _seg_mask(s: Sources) -> np.ndarray:
    return _ones(s.n_segments)


def _waveform(s: Sources) -> np.ndarray:
    return s.analysis.audio.astype(np.float32, copy=False)


def _waveform_mask(s: Sources) -> np.ndarray:
    return _ones(len(s.analysis.audio))


def _enc_patches(s: Sources) -> np.ndarray:
    """Encoder frames pooled on the VGGish patch grid, so both patch kinds share ``patch_mask``."""
    return _pool(s.encoder, PATCH_ENC_FRAMES, s.n_patches)


def _logmel_patches(s: Sources) -> np.ndarray:
    return s.acoustic.logmel_patches


def _patch_mask(s: Sources) -> np.ndarray:
    return _ones(s.n_patches)


def _encoder(s: Sources) -> np.ndarray:
    return s.encoder


def _encoder_cm(s: Sources) -> np.ndarray:
    return F.frame_confidence(s.analysis.transcript.words, len(s.encoder), ENCODER_HOP_S)


def _encoder_mask(s: Sources) -> np.ndarray:
    return _ones(len(s.encoder))


def _frames_in_segments(duration_s: float) -> int:
    """Real 10-ms frames of an utterance: the rows of ``mfcc_seg``/``spec_seg`` before the padding."""
    return F.n_frames(int(round(duration_s * F.SAMPLE_RATE)))


def _encoder_frames_in_segments(duration_s: float) -> int:
    """Real 20-ms encoder frames of an utterance: the rows of ``enc_seg`` before the padding."""
    return max(1, math.ceil(duration_s * SEGMENT_ENC_FRAMES / SEGMENT_S))


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What one named input is, for everything that feeds, trains, exports or fakes a model.

    ``axes``: the per-utterance axes. ``axes[0]`` is always the variable-length sequence axis, by the
    symbolic name the ONNX graphs give it (inputs sharing it always have equal lengths); later axes
    are fixed sizes, or the name of a width that depends on the configured part (``text_dim`` ...).
    ``mask``: the input whose 1.0 entries mark the real steps of ``axes[0]`` (None for masks).
    ``continuous``: training standardises it with training-split statistics over its last axis.
    ``augment``: how training perturbs it (``training.augment``): "frames" (noise, time masks),
    "waveform" (noise at a random SNR) or None.
    ``real_rows``: for inputs whose mask marks whole segments, the number of real leading rows (all
    axes but the last flattened) of an utterance of that duration: the rest is zero padding.
    """

    name: str
    axes: tuple[str | int, ...]
    producer: Callable[[Sources], np.ndarray]
    description: str
    mask: str | None = None
    continuous: bool = False
    augment: str | None = None
    real_rows: Callable[[float], int] | None = None
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def sequence(self) -> str:
        """Symbolic name of the variable-length first axis (ONNX dynamic axis 1 after the batch)."""
        return str(self.axes[0])

    @property
    def width(self) -> int | str | None:
        """Last-axis size: an int when fixed, a dimension name when it depends on the configured part,
        None for one value per step."""
        return self.axes[-1] if len(self.axes) > 1 else None

    @property
    def rank(self) -> int:
        """Rank of the batched array (batch axis included)."""
        return 1 + len(self.axes)

    def compute(self, analysis, max_words: int = 100) -> np.ndarray:
        """This input alone for one analysis (``model_inputs`` shares work between several)."""
        return self.producer(Sources(analysis, max_words))


def _specs(*specs: InputSpec) -> dict[str, InputSpec]:
    return {s.name: s for s in specs}


INPUTS: dict[str, InputSpec] = _specs(
    InputSpec(
        "frames33",
        ("frames", 33),
        _frames33,
        "MFCC-20, CQT-12, F0 at 10 ms (cmt-awc)",
        mask="frames33_mask",
        continuous=True,
        augment="frames",
    ),
    InputSpec(
        "frames33_cm",
        ("frames",),
        _frames33_cm,
        "confidence of the word covering each 10-ms frame",
        mask="frames33_mask",
    ),
    InputSpec("frames33_mask", ("frames",), _frames33_mask, "1 per 10-ms frame"),
    InputSpec(
        "words",
        ("words", "text_dim"),
        _words,
        "contextual vector per ASR word (cmt-awc, 3m-ser)",
        mask="words_mask",
        continuous=True,
    ),
    InputSpec(
        "words_static",
        ("words", "word_dim"),
        _words_static,
        "static vector per word (adf): GloVe or substitute +",
        mask="words_mask",
        continuous=True,
    ),
    InputSpec("words_cm", ("words",), _words_cm, "ASR confidence per word", mask="words_mask"),
    InputSpec("words_mask", ("words",), _words_mask, "1 per word (one for an empty transcript)"),
    InputSpec(
        "mfcc_seg",
        ("segments", SEGMENT_FRAMES, 40),
        _mfcc_seg,
        "HTK MFCC-40 per 3-s segment (ca-mser)",
        mask="seg_mask",
        continuous=True,
        augment="frames",
        real_rows=_frames_in_segments,
    ),
    InputSpec(
        "spec_seg",
        ("segments", SEGMENT_FRAMES, F.SPEC_BINS),
        _spec_seg,
        "linear spectrogram per 3-s segment (ca-mser)",
        mask="seg_mask",
        continuous=True,
        augment="frames",
        real_rows=_frames_in_segments,
    ),
    InputSpec(
        "enc_seg",
        ("segments", SEGMENT_ENC_FRAMES, "enc_dim"),
        _enc_seg,
        "wav2vec2 or Whisper frames per 3-s segment +",
        mask="seg_mask",
        continuous=True,
        augment="frames",
        real_rows=_encoder_frames_in_segments,
    ),
    InputSpec("seg_mask", ("segments",), _seg_mask, "1 per 3-s segment"),
    InputSpec(
        "waveform",
        ("samples",),
        _waveform,
        "raw 16-kHz samples (adf; chunked inside the graph)",
        mask="waveform_mask",
        augment="waveform",
    ),
    InputSpec("waveform_mask", ("samples",), _waveform_mask, "1 per sample"),
    InputSpec(
        "enc_patches",
        ("patches", "enc_dim"),
        _enc_patches,
        "Whisper encoder frames mean-pooled per 0.96 s",
        mask="patch_mask",
        continuous=True,
        augment="frames",
    ),
    InputSpec(
        "logmel_patches",
        ("logmel_patches", F.VGGISH_PATCH, F.VGGISH_BANDS),
        _logmel_patches,
        'VGGish log-mel patches (3m-ser audio="vggish")',
        mask="patch_mask",
        continuous=True,
        augment="frames",
    ),
    InputSpec("patch_mask", ("patches",), _patch_mask, "1 per 0.96-s patch (both patch kinds)"),
    InputSpec(
        "encoder",
        ("encoder_frames", "enc_dim"),
        _encoder,
        "Whisper encoder frames at 20 ms",
        mask="encoder_mask",
        continuous=True,
        augment="frames",
    ),
    InputSpec(
        "encoder_cm",
        ("encoder_frames",),
        _encoder_cm,
        "confidence of the word covering each 20-ms frame",
        mask="encoder_mask",
    ),
    InputSpec("encoder_mask", ("encoder_frames",), _encoder_mask, "1 per encoder frame"),
)

# the mask inputs: every name some input's ``mask`` points to
MASKS: frozenset[str] = frozenset(s.mask for s in INPUTS.values() if s.mask)


def _known(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in INPUTS]
    if unknown:
        raise KeyError(f"unknown model inputs {unknown}; known: {', '.join(INPUTS)}")
    return names


def inputs_for(model_input_names: Iterable[str]) -> tuple[str, ...]:
    """The inputs to compute for models declaring ``model_input_names`` (one model's or several
    models' together): those names and their masks, in registry order. Unknown names raise
    ``KeyError``, so a model reading an input nobody produces fails when it is loaded, not per request."""
    wanted = set(_known(model_input_names))
    wanted |= {mask for n in wanted if (mask := INPUTS[n].mask)}
    return tuple(n for n in INPUTS if n in wanted)


def model_inputs(
    analysis,
    names: Iterable[str] | None = None,
    max_words: int = 100,
    encoder_shift: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The named inputs for one analysed utterance (all of them when ``names`` is None), in the order
    asked for. Only the features those inputs need are computed, each once (``Sources``).
    ``encoder_shift``: a (E,) vector added to every Whisper encoder frame first (``Sources.encoder``;
    wav2vec2 ``speech_frames`` are not shifted)."""
    sources = Sources(analysis, max_words, encoder_shift)
    return {n: INPUTS[n].producer(sources) for n in (INPUTS if names is None else _known(names))}


def _shape(spec: InputSpec) -> str:
    return "(" + ", ".join(map(str, spec.axes)) + ("," if len(spec.axes) == 1 else "") + ")"


def table() -> str:
    """The registry as the Markdown table in this module's docstring."""
    widths = (14, 25, 13, 51)
    rows = [("name", "shape", "mask", "what")]
    rows += [(s.name, _shape(s), s.mask or "", s.description) for s in INPUTS.values()]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def collate(
    samples: Sequence[dict[str, np.ndarray]], names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Stack per-utterance inputs into a batch, zero-padding the first axis to the longest."""
    names = list(names) if names is not None else list(samples[0])
    batch = {}
    for name in names:
        arrays = [s[name] for s in samples]
        longest = max(a.shape[0] for a in arrays)
        out = np.zeros((len(arrays), longest) + arrays[0].shape[1:], dtype=np.float32)
        for i, a in enumerate(arrays):
            out[i, : a.shape[0]] = a
        batch[name] = out
    return batch
