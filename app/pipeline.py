"""The single path from audio to everything the four models consume.

``analyze(audio)`` is called by the server for every utterance and by ``training`` to fill its
feature cache, so a model is always trained on exactly the features it is served with.

Thread-safety: ``Analyzer`` holds the ASR model and the text encoder, both safe to call from several
threads (CTranslate2 and ONNX Runtime sessions are thread-safe); the feature functions are pure.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import numpy as np

from app import features as F
from app.asr import Transcript
from app.text import TextFeatures

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class FeatureConfig:
    """Every knob that changes a feature value. Its hash keys the training cache and model cards."""

    sample_rate: int = SAMPLE_RATE
    hop_s: float = 0.010
    segment_s: float = 3.0
    chunk_s: float = 0.250
    chunk_shift_s: float = 0.010
    max_words: int = 100
    asr_model: str = "tiny.en"
    text_model: str = "all-MiniLM-L6-v2"
    version: int = 1

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Analysis:
    """Everything the models need for one utterance (<= 30 s of 16-kHz mono audio)."""

    audio: np.ndarray  # (N,) float32, 16 kHz
    transcript: Transcript
    text: TextFeatures
    acoustic: F.AcousticFeatures
    timing_ms: dict[str, float] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def _now_ms() -> float:
    return time.perf_counter() * 1000.0


class Analyzer:
    """Runs ASR, text encoding and acoustic features for one utterance at a time."""

    def __init__(self, recognizer=None, text_encoder=None, config: FeatureConfig | None = None):
        from app.asr import Recognizer
        from app.text import TextEncoder

        self.recognizer = recognizer or Recognizer()
        self.text_encoder = text_encoder or TextEncoder()
        self.config = config or FeatureConfig()

    @classmethod
    def from_settings(
        cls, settings=None, asr_threads: int | None = None, asr_workers: int | None = None
    ) -> Analyzer:
        """ASR and text encoder configured by ``app.settings.Settings``. The text encoder runs right
        after ASR in the same worker, so it gets ASR's thread share (``asr_threads``)."""
        from app.asr import Recognizer
        from app.settings import get_settings
        from app.text import TextEncoder

        s = settings or get_settings()
        recognizer = Recognizer.from_settings(s, cpu_threads=asr_threads, num_workers=asr_workers)
        text_encoder = TextEncoder(
            s.text_model or None, providers=["CPUExecutionProvider"], threads=asr_threads or 0
        )
        return cls(recognizer, text_encoder)

    def analyze(self, audio: np.ndarray) -> Analysis:
        """16-kHz mono float32 audio (one utterance, <= 30 s) -> every model input."""
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        t0 = _now_ms()
        transcript = self.recognizer.transcribe(audio)
        t1 = _now_ms()
        text = self.text_encoder.encode(
            [w.word for w in transcript.words], [w.confidence for w in transcript.words]
        )
        t2 = _now_ms()
        acoustic = F.compute_acoustic(audio)
        t3 = _now_ms()
        return Analysis(
            audio=audio,
            transcript=transcript,
            text=text,
            acoustic=acoustic,
            timing_ms={"asr": t1 - t0, "text": t2 - t1, "features": t3 - t2},
        )


_default: Analyzer | None = None


def analyze(audio: np.ndarray) -> Analysis:
    """``Analyzer().analyze`` on a process-wide default analyzer (bundled models, CPU/GPU auto)."""
    global _default
    if _default is None:
        _default = Analyzer()
    return _default.analyze(audio)
