"""Streaming Silero VAD: the ONNX model faster-whisper ships, fed 32-ms windows as audio arrives.

faster-whisper's ``get_speech_timestamps`` runs the model over a whole clip; the
model is recurrent (``h``/``c`` state plus 64 samples of left context), so feeding it one 512-sample
window at a time with the state carried over gives exactly the same probabilities (checked in
``tests/test_streaming_state.py``). One window costs ~0.1 ms on a CPU core.

Thread-safety: the ONNX session is shared and thread-safe; a ``StreamingVAD`` instance holds one
stream's recurrent state and must be fed from one thread (or one coroutine) at a time.
"""

from __future__ import annotations

import numpy as np

WINDOW = 512  # samples at 16 kHz = 32 ms, the window the model was trained on
CONTEXT = 64


def _session():
    from faster_whisper.vad import get_vad_model  # lru_cached: one session per process

    return get_vad_model().session


class StreamingVAD:
    """Speech probability per 512-sample window of a 16-kHz stream."""

    def __init__(self) -> None:
        self._session = _session()
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, CONTEXT), dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def feed(self, audio: np.ndarray) -> np.ndarray:
        """Probabilities of every window completed by ``audio`` (leftover samples are kept)."""
        buf = np.concatenate([self._pending, np.asarray(audio, dtype=np.float32)])
        n = len(buf) // WINDOW
        self._pending = buf[n * WINDOW :]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        out = np.empty(n, dtype=np.float32)
        for i in range(n):
            window = buf[i * WINDOW : (i + 1) * WINDOW][None, :]
            x = np.concatenate([self._context, window], axis=1)
            prob, self._h, self._c = self._session.run(None, {"input": x, "h": self._h, "c": self._c})
            out[i] = float(np.asarray(prob).reshape(-1)[0])
            self._context = window[:, -CONTEXT:]
        return out

    @property
    def pending_samples(self) -> int:
        return len(self._pending)
