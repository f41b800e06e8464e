"""Identity of a local pretrained part (wav2vec2 directory, GloVe file) for ``FeatureConfig``.

A part is named ``<file or directory name>:<first 12 hex digits of the sha256 of its files>``, so
the feature digest changes when the weights change, and not when the files are moved. Hashes are
remembered per (path, size, mtime) for the life of the process, so the training CLI (which needs
the digest before it loads anything) and the loader that follows do not hash a 1-GB file twice.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path

_BLOCK = 1 << 22
_lock = threading.Lock()
_known: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of one file's bytes (memoised per path, size and modification time)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _known:
            return _known[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    digest = h.hexdigest()
    with _lock:
        _known[key] = digest
    return digest


def identity(name: str, files: Iterable[str | Path]) -> str:
    """``name:<12 hex>`` over the contents of ``files`` (in the order given)."""
    h = hashlib.sha256()
    for f in files:
        h.update(file_sha256(f).encode())
    return f"{name}:{h.hexdigest()[:12]}"
