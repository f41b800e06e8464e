"""Static word vectors from a local GloVe text file: adf's paper-faithful ``words_static`` (SPEC §2).

By default adf reads the text encoder's input-embedding vectors (the GloVe substitute). With
``EMOTION_GLOVE_PATH=FILE`` (serving) or ``--glove FILE`` (training) it reads the vector of each
ASR word from ``FILE`` instead: one ``word v1 ... vD`` line per word, separated by single spaces
(GloVe's text format; a word2vec-style ``<count> <dim>`` header line is skipped). A word is looked
up lower-cased with its surrounding punctuation stripped (``"Door."`` -> ``door``), then as
written in lower case (``u.s.``), then with its case kept (cased vocabularies); a word found in
none of these forms (out of vocabulary) gets a zero vector, as does the placeholder word of an
empty transcript.

Loading does not parse the file: it is memory-mapped, one pass over it records where each word's
line starts, and a line is parsed only when its word is looked up. A 400k-word, 300-d, 1-GB file
opens in about 1.5 s here (hashing it for the feature digest, see ``app.analysis.pretrained``, included);
the index takes tens of MB, the mapped file stays in the shared, reclaimable page cache.
``WordVectors.load`` returns the same object for the same unchanged file, so a process never
indexes it twice.

Thread-safety: ``lookup`` may be called from several threads: after construction the object only
reads its index and the read-only memory map.
"""

from __future__ import annotations

import logging
import mmap
import string
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app.analysis import pretrained

log = logging.getLogger(__name__)

PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026\u2013\u2014"


def candidates(word: str) -> list[str]:
    """The forms under which an ASR word is looked up, in order (duplicates removed)."""
    w = word.strip().replace("\u2019", "'")
    forms = [w.lower().strip(PUNCTUATION), w.lower(), w.strip(PUNCTUATION)]
    return [f for i, f in enumerate(forms) if f and f not in forms[:i]]


class WordVectors:
    _loaded: dict[tuple[str, int, int], WordVectors] = {}
    _load_lock = threading.Lock()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._warned = False
        with open(self.path, "rb") as fh:
            if fh.seek(0, 2) == 0:
                raise ValueError(f"word vector file {self.path} is empty")
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.dim, start = self._header()
        self._index = self._build_index(start)
        if not self._index:
            raise ValueError(f"word vector file {self.path} holds no 'word v1 ... vD' line")
        self.identity = self.identity_of(self.path)

    @classmethod
    def load(cls, path: str | Path) -> WordVectors:
        """One instance per unchanged file and process (indexing and hashing are done once)."""
        p = Path(path).resolve()
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        with cls._load_lock:
            if key not in cls._loaded:
                cls._loaded[key] = cls(p)
            return cls._loaded[key]

    @staticmethod
    def identity_of(path: str | Path) -> str:
        """``<file name>:<hash of the file>`` (see ``app.analysis.pretrained``)."""
        return pretrained.identity(Path(path).name, [path])

    def _header(self) -> tuple[int, int]:
        """(dimension, offset of the first vector line); skips a ``<count> <dim>`` header."""
        mm = self._mm
        end = mm.find(b"\n")
        end = len(mm) if end < 0 else end
        fields = mm[:end].split()
        if len(fields) == 2 and all(f.isdigit() for f in fields):
            return int(fields[1]), end + 1
        if len(fields) < 2:
            raise ValueError(f"{self.path}: the first line is not 'word v1 ... vD'")
        return len(fields) - 1, 0

    def _build_index(self, pos: int) -> dict[bytes, int]:
        """word (UTF-8 bytes) -> offset of its line; the first line of a repeated word wins."""
        index: dict[bytes, int] = {}
        mm, n, find = self._mm, len(self._mm), self._mm.find
        while pos < n:
            end = find(b"\n", pos)
            if end < 0:
                end = n
            space = find(b" ", pos, end)
            if space > pos:
                word = mm[pos:space]
                if word not in index:
                    index[word] = pos
            pos = end + 1
        return index

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, word: str) -> bool:
        return word.encode("utf-8") in self._index

    def vector(self, word: str) -> np.ndarray | None:
        """The vector of ``word`` exactly as written in the file, or None."""
        pos = self._index.get(word.encode("utf-8"))
        if pos is None:
            return None
        end = self._mm.find(b"\n", pos)
        fields = self._mm[pos : len(self._mm) if end < 0 else end].split()
        if len(fields) < self.dim + 1:
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: malformed line for %r (%d fields); using zeros", self.path, word, len(fields)
                )
            return None
        return np.asarray(fields[-self.dim :], dtype=np.float32)

    def lookup(self, words: Sequence[str]) -> np.ndarray:
        """(len(words), dim) float32: each word's vector (see ``candidates``), zeros when unknown."""
        out = np.zeros((len(words), self.dim), np.float32)
        for i, word in enumerate(words):
            for form in candidates(word):
                v = self.vector(form)
                if v is not None:
                    out[i] = v
                    break
        return out
