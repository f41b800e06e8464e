"""The single path from audio to everything the four models consume.

``analyze(audio)`` is called by the server for every utterance and by ``training`` to fill its
feature cache, so a model is always trained on exactly the features it is served with.

Thread-safety: ``Analyzer`` holds the ASR model, the text encoder and the optional speech encoder and
word vectors, all safe to call from several threads (CTranslate2 and ONNX Runtime sessions are
thread-safe; the word vectors are read-only); the feature functions are pure.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.analysis import features as F
from app.analysis.asr import Transcript
from app.analysis.text import TextFeatures

SAMPLE_RATE = 16000


# Fields added after models had been shipped. They are left out of ``to_dict`` (and so of the
# digest) while they hold their default, so that the default configuration keeps its digest
# (313dcb849f9227be) and the caches and model cards keyed by it stay valid.
_OPTIONAL_DEFAULTS = {"speech_encoder": "", "word_vectors": ""}


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
    # ca-mser's enc_seg: "" = Whisper encoder frames, else a wav2vec2 export ("<dir>:<hash>")
    speech_encoder: str = ""
    # adf's words_static: "" = the text encoder's input embeddings, else a GloVe file ("<file>:<hash>")
    word_vectors: str = ""

    @classmethod
    def for_parts(
        cls,
        speech_encoder: str | Path | None = None,
        glove: str | Path | None = None,
        text_model: str | Path | None = None,
        asr_model: str | Path | None = None,
        **fields,
    ) -> FeatureConfig:
        """The config of an analyzer using these local parts: a wav2vec2 ONNX directory
        (``app.analysis.speech_encoder``), a GloVe file (``app.analysis.word_vectors``), a text encoder directory
        (``app.analysis.text``, e.g. an exported BERT) and a faster-whisper directory (``app.analysis.asr``).
        Hashes the files; loads nothing."""
        from app.analysis.asr import Recognizer
        from app.analysis.speech_encoder import SpeechEncoder
        from app.analysis.text import TextEncoder
        from app.analysis.word_vectors import WordVectors

        if text_model:
            fields["text_model"] = TextEncoder.identity_of(text_model)
        if asr_model:
            fields["asr_model"] = Recognizer.identity_of(asr_model)
        if speech_encoder:
            fields["speech_encoder"] = SpeechEncoder.identity_of(speech_encoder)
        if glove:
            fields["word_vectors"] = WordVectors.identity_of(glove)
        return cls(**fields)

    @classmethod
    def from_settings(cls, settings=None) -> FeatureConfig:
        """What ``Analyzer.from_settings(settings)`` computes (``EMOTION_SPEECH_ENCODER``,
        ``EMOTION_GLOVE_PATH``, ``EMOTION_TEXT_MODEL``, ``EMOTION_ASR_MODEL``)."""
        from app.settings import get_settings

        s = settings or get_settings()
        return cls.for_parts(
            s.speech_encoder or None,
            s.glove_path or None,
            text_model=s.text_model or None,
            asr_model=s.asr_model or None,
        )

    def to_dict(self) -> dict:
        return {
            k: v
            for k, v in self.__dict__.items()
            if not (k in _OPTIONAL_DEFAULTS and v == _OPTIONAL_DEFAULTS[k])
        }

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
    speech_frames: np.ndarray | None = None  # (S, 150, H) wav2vec2 frames per 3-s segment, if configured
    word_vectors: np.ndarray | None = None  # (W, D) GloVe vector per word of ``text``, if configured

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def _now_ms() -> float:
    return time.perf_counter() * 1000.0


class Analyzer:
    """Runs ASR, text encoding and acoustic features for one utterance at a time.

    Optional paper-faithful parts (SPEC §2): ``speech_encoder`` (``app.analysis.speech_encoder.SpeechEncoder``,
    wav2vec2 frames for ca-mser) and ``word_vectors`` (``app.analysis.word_vectors.WordVectors``, GloVe for
    adf). The config names them; a ``config`` that names other parts than those given is refused.
    """

    def __init__(
        self,
        recognizer=None,
        text_encoder=None,
        config: FeatureConfig | None = None,
        speech_encoder=None,
        word_vectors=None,
    ):
        from app.analysis.asr import Recognizer
        from app.analysis.text import TextEncoder

        self.recognizer = recognizer or Recognizer()
        self.text_encoder = text_encoder or TextEncoder()
        self.speech_encoder = speech_encoder
        self.word_vectors = word_vectors
        parts = {
            "speech_encoder": speech_encoder.identity if speech_encoder is not None else "",
            "word_vectors": word_vectors.identity if word_vectors is not None else "",
            # test doubles without an identity stand for the bundled parts
            "asr_model": getattr(self.recognizer, "identity", FeatureConfig.asr_model),
            "text_model": getattr(self.text_encoder, "identity", FeatureConfig.text_model),
        }
        if config is None:
            config = FeatureConfig(**parts)
        wrong = {k: getattr(config, k) for k, v in parts.items() if getattr(config, k) != v}
        if wrong:
            raise ValueError(f"the feature config names {wrong}, but the analyzer was given {parts}")
        self.config = config

    @classmethod
    def from_settings(
        cls, settings=None, asr_threads: int | None = None, asr_workers: int | None = None
    ) -> Analyzer:
        """ASR, text encoder and the optional pretrained parts configured by ``app.settings.Settings``.
        The text and speech encoders run right after ASR in the same worker, so they get ASR's thread
        share (``asr_threads``)."""
        from app.analysis.asr import Recognizer
        from app.analysis.text import TextEncoder
        from app.settings import get_settings

        s = settings or get_settings()
        recognizer = Recognizer.from_settings(s, cpu_threads=asr_threads, num_workers=asr_workers)
        text_encoder = TextEncoder(
            s.text_model or None, providers=["CPUExecutionProvider"], threads=asr_threads or 0
        )
        speech_encoder = word_vectors = None
        if s.speech_encoder:
            from app.analysis.speech_encoder import SpeechEncoder

            speech_encoder = SpeechEncoder(
                s.speech_encoder, providers=["CPUExecutionProvider"], threads=asr_threads or 0
            )
        if s.glove_path:
            from app.analysis.word_vectors import WordVectors

            word_vectors = WordVectors.load(s.glove_path)
        return cls(recognizer, text_encoder, speech_encoder=speech_encoder, word_vectors=word_vectors)

    def analyze(self, audio: np.ndarray) -> Analysis:
        """16-kHz mono float32 audio (one utterance, <= 30 s) -> every model input."""
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        t0 = _now_ms()
        transcript = self.recognizer.transcribe(audio)
        t1 = _now_ms()
        text = self.text_encoder.encode(
            [w.word for w in transcript.words], [w.confidence for w in transcript.words]
        )
        vectors = self.word_vectors.lookup(text.words) if self.word_vectors is not None else None
        t2 = _now_ms()
        acoustic = F.compute_acoustic(audio)
        t3 = _now_ms()
        timing = {"asr": t1 - t0, "text": t2 - t1, "features": t3 - t2}
        frames = None
        if self.speech_encoder is not None:
            frames = self.speech_encoder.segment_frames(audio)
            timing["speech_encoder"] = _now_ms() - t3
        return Analysis(
            audio=audio,
            transcript=transcript,
            text=text,
            acoustic=acoustic,
            timing_ms=timing,
            speech_frames=frames,
            word_vectors=vectors,
        )


_default: Analyzer | None = None


def analyze(audio: np.ndarray) -> Analysis:
    """``Analyzer().analyze`` on a process-wide default analyzer (bundled models, CPU/GPU auto)."""
    global _default
    if _default is None:
        _default = Analyzer()
    return _default.analyze(audio)
