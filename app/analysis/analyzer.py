"""The single path from audio to everything the four models consume.

``AnalyzerSpec`` names the parts (ASR model and how it decodes, text encoder, optional pretrained
parts, the utterance policy); the server builds it from settings and the training CLI from its
flags, and both build the ``Analyzer`` from it. ``FeatureConfig`` is *derived* from the same spec:
every part's identity and every constant that changes a feature value, so its digest (which keys
the training cache and every model card) changes whenever a feature could.

``Analyzer`` exposes the work as batch stages, so a scheduler can batch utterances of different
requests and streams: ``transcribe_batch`` (ASR, ``app.analysis.asr``), ``finish_batch`` (text
encoder on the batch, optional speech encoder and word vectors), and ``analyze_batch`` (both).
Acoustic inputs are not computed here: the engine's ASR lane calls ``app.analysis.inputs.
model_inputs`` for exactly the inputs its loaded models declare, in the lane's thread.

Thread-safety: ``Analyzer`` holds the ASR model, the text encoder and the optional speech encoder and
word vectors, all safe to call from several threads (CTranslate2 and ONNX Runtime sessions are
thread-safe; the word vectors are read-only); the feature functions are pure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.analysis import features as F
from app.analysis.asr import DEFAULT_ENCODER_WINDOW, Transcript, resolve_compute_type
from app.analysis.segmenter import UtterancePolicy
from app.analysis.text import TextFeatures

SAMPLE_RATE = 16000
FEATURE_VERSION = 2  # 2: utterance policy cut, staged batch ASR without timestamp tokens


@dataclass(frozen=True)
class FeatureConfig:
    """Every knob that changes a feature value; derived from the parts (``AnalyzerSpec``)."""

    sample_rate: int = SAMPLE_RATE
    max_words: int = 100
    asr_model: str = "tiny.en"
    asr_compute_type: str = "int8"
    asr_beam_size: int = 1
    asr_language: str | None = "en"
    asr_encoder_window: str = DEFAULT_ENCODER_WINDOW
    text_model: str = "all-MiniLM-L6-v2"
    # ca-mser's enc_seg: "" = Whisper encoder frames, else a wav2vec2 export ("<dir>:<hash>")
    speech_encoder: str = ""
    # adf's words_static: "" = the text encoder's input embeddings, else a GloVe file ("<file>:<hash>")
    word_vectors: str = ""
    utterance: UtterancePolicy = UtterancePolicy()
    version: int = FEATURE_VERSION

    @classmethod
    def for_parts(
        cls,
        speech_encoder: str | Path | None = None,
        glove: str | Path | None = None,
        text_model: str | Path | None = None,
        asr_model: str | Path | None = None,
        **fields: Any,
    ) -> FeatureConfig:
        """The config of an analyzer with these local parts (hashes the files; loads nothing)."""
        return AnalyzerSpec(
            asr_model=str(asr_model or ""),
            text_model=str(text_model or ""),
            speech_encoder=str(speech_encoder or ""),
            glove_path=str(glove or ""),
        ).feature_config(**fields)

    @classmethod
    def from_settings(cls, settings=None) -> FeatureConfig:
        """What the server's analyzer computes with these settings."""
        return AnalyzerSpec.from_settings(settings).feature_config()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class AnalyzerSpec:
    """The parts of an analyzer; one spec builds it for the server and for training."""

    asr_model: str = ""  # a name in app.analysis.asr_models or a directory; "" = the device's default
    device: str = "auto"
    compute_type: str = "default"
    beam_size: int = 1
    language: str | None = "en"
    encoder_window: str = ""  # "" = the ASR model's own (app.analysis.asr_models.default_encoder_window)
    text_model: str = ""  # ONNX text encoder directory; "" = bundled all-MiniLM-L6-v2
    speech_encoder: str = ""  # wav2vec2 ONNX directory for ca-mser; "" = Whisper frames
    glove_path: str = ""  # GloVe text file for adf; "" = the text encoder's input embeddings
    utterance: UtterancePolicy = UtterancePolicy()
    max_words: int = 100
    # how fast, not what: not part of the feature identity
    cpu_threads: int = 0
    num_workers: int = 1

    @classmethod
    def from_settings(cls, settings=None, **overrides: Any) -> AnalyzerSpec:
        from app.settings import get_settings

        s = settings or get_settings()
        spec = cls(
            asr_model=s.asr_model,
            device=s.device,
            compute_type=s.asr_compute_type,
            beam_size=s.asr_beam_size,
            language=s.asr_language,
            encoder_window=s.asr_encoder_window,
            text_model=s.text_model,
            speech_encoder=s.speech_encoder,
            glove_path=s.glove_path,
            utterance=UtterancePolicy.from_settings(s),
            cpu_threads=s.asr_cpu_threads,
        )
        return dataclasses.replace(spec, **overrides)

    def asr_name(self) -> str:
        """``asr_model``, or the default for the device (``app.analysis.asr_models.default_name``)."""
        from app.analysis.asr import resolve_device
        from app.analysis.asr_models import default_name

        return self.asr_model or default_name(resolve_device(self.device))

    def resolved_encoder_window(self) -> str:
        from app.analysis.asr_models import default_encoder_window

        return self.encoder_window or default_encoder_window(self.asr_name())

    def feature_config(self, **fields: Any) -> FeatureConfig:
        """The features this spec computes; hashes the local parts' files, loads no model."""
        from app.analysis.asr import Recognizer
        from app.analysis.speech_encoder import SpeechEncoder
        from app.analysis.text import TextEncoder
        from app.analysis.word_vectors import WordVectors

        derived: dict[str, Any] = dict(
            max_words=self.max_words,
            asr_model=Recognizer.identity_of(self.asr_name()),
            asr_compute_type=resolve_compute_type(self.compute_type),
            asr_beam_size=self.beam_size,
            asr_language=self.language,
            asr_encoder_window=self.resolved_encoder_window(),
            text_model=TextEncoder.identity_of(self.text_model or None),
            speech_encoder=SpeechEncoder.identity_of(self.speech_encoder) if self.speech_encoder else "",
            word_vectors=WordVectors.identity_of(self.glove_path) if self.glove_path else "",
            utterance=self.utterance,
        )
        derived.update(fields)
        return FeatureConfig(**derived)

    def build(self, asr_threads: int | None = None, asr_workers: int | None = None) -> Analyzer:
        """Load every part. The text and speech encoders run right after ASR in the same worker,
        so they get ASR's thread share (``asr_threads``)."""
        from app.analysis.asr import Recognizer
        from app.analysis.text import TextEncoder

        threads = self.cpu_threads if asr_threads is None else asr_threads
        recognizer = Recognizer(
            model_path=self.asr_name(),
            device=self.device,
            compute_type=self.compute_type,
            beam_size=self.beam_size,
            language=self.language,
            cpu_threads=threads,
            num_workers=self.num_workers if asr_workers is None else asr_workers,
            encoder_window=self.resolved_encoder_window(),
        )
        text_encoder = TextEncoder(
            self.text_model or None, providers=["CPUExecutionProvider"], threads=threads
        )
        speech_encoder = word_vectors = None
        if self.speech_encoder:
            from app.analysis.speech_encoder import SpeechEncoder

            speech_encoder = SpeechEncoder(
                self.speech_encoder, providers=["CPUExecutionProvider"], threads=threads
            )
        if self.glove_path:
            from app.analysis.word_vectors import WordVectors

            word_vectors = WordVectors.load(self.glove_path)
        return Analyzer(
            recognizer,
            text_encoder,
            speech_encoder=speech_encoder,
            word_vectors=word_vectors,
            policy=self.utterance,
            max_words=self.max_words,
        )


@dataclass
class Analysis:
    """Everything the models need for one utterance (<= 30 s of 16-kHz mono audio)."""

    audio: np.ndarray  # (N,) float32, 16 kHz
    transcript: Transcript
    text: TextFeatures
    acoustic: F.AcousticFeatures | None = None  # None: computed on demand by app.analysis.inputs
    timing_ms: dict[str, float] = field(default_factory=dict)
    speech_frames: np.ndarray | None = None  # (S, 150, H) wav2vec2 frames per 3-s segment, if configured
    word_vectors: np.ndarray | None = None  # (W, D) GloVe vector per word of ``text``, if configured
    inputs: dict[str, np.ndarray] | None = None  # model inputs, when the engine computed them

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def _now_ms() -> float:
    return time.perf_counter() * 1000.0


class Analyzer:
    """ASR, text encoding and the optional pretrained parts, as batch stages.

    Optional paper-faithful parts (SPEC §2): ``speech_encoder`` (wav2vec2 frames for ca-mser) and
    ``word_vectors`` (GloVe for adf). ``config`` is derived from the parts given; a ``config`` passed
    in that names other parts is refused.
    """

    def __init__(
        self,
        recognizer=None,
        text_encoder=None,
        config: FeatureConfig | None = None,
        speech_encoder=None,
        word_vectors=None,
        policy: UtterancePolicy | None = None,
        max_words: int = 100,
    ):
        from app.analysis.asr import Recognizer
        from app.analysis.text import TextEncoder

        default = config or FeatureConfig()
        self.recognizer = recognizer or Recognizer(
            device="cpu",
            compute_type=default.asr_compute_type,
            beam_size=default.asr_beam_size,
            language=default.asr_language,
            encoder_window=default.asr_encoder_window,
        )
        self.text_encoder = text_encoder or TextEncoder()
        self.speech_encoder = speech_encoder
        self.word_vectors = word_vectors
        rec = self.recognizer
        # test doubles without these attributes stand for the bundled parts with default decoding
        derived = FeatureConfig(
            max_words=config.max_words if config is not None else max_words,
            asr_model=getattr(rec, "identity", default.asr_model),
            asr_compute_type=getattr(rec, "compute_type", default.asr_compute_type),
            asr_beam_size=getattr(rec, "beam_size", default.asr_beam_size),
            asr_language=getattr(rec, "language", default.asr_language),
            asr_encoder_window=getattr(rec, "encoder_window", default.asr_encoder_window),
            text_model=getattr(self.text_encoder, "identity", default.text_model),
            speech_encoder=speech_encoder.identity if speech_encoder is not None else "",
            word_vectors=word_vectors.identity if word_vectors is not None else "",
            utterance=policy or (config.utterance if config is not None else UtterancePolicy()),
        )
        if config is not None and config != derived:
            wrong = {k: v for k, v in config.to_dict().items() if derived.to_dict()[k] != v}
            raise ValueError(
                f"the feature config names {wrong}, but the analyzer was given {derived.to_dict()}"
            )
        self.config = derived
        self.policy = derived.utterance

    @classmethod
    def from_settings(
        cls, settings=None, asr_threads: int | None = None, asr_workers: int | None = None
    ) -> Analyzer:
        """``AnalyzerSpec.from_settings(settings).build(...)``."""
        return AnalyzerSpec.from_settings(settings).build(asr_threads, asr_workers)

    # --- stages -------------------------------------------------------------------------------

    def transcribe_batch(
        self, audios: Sequence[np.ndarray], timed: Sequence[bool] | None = None
    ) -> list[Transcript]:
        """ASR of several utterances (16-kHz mono float32, each <= 30 s) in one batched pass;
        ``timed[i]`` False = words without times or confidences (no alignment: streaming partials)."""
        audios = [np.ascontiguousarray(a, dtype=np.float32).reshape(-1) for a in audios]
        return self.recognizer.transcribe_batch(audios, timed)

    def finish_batch(self, audios: Sequence[np.ndarray], transcripts: Sequence[Transcript]) -> list[Analysis]:
        """Text encoder on the batch, then the optional pretrained parts, per transcript."""
        t0 = _now_ms()
        texts = self.text_encoder.encode_batch(
            [([w.word for w in tr.words], [w.confidence for w in tr.words]) for tr in transcripts]
        )
        text_ms = (_now_ms() - t0) / max(1, len(transcripts))
        out = []
        for audio, tr, text in zip(audios, transcripts, texts, strict=True):
            audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
            timing = {"asr": tr.timing_ms.get("asr", 0.0), "text": text_ms}
            vectors = self.word_vectors.lookup(text.words) if self.word_vectors is not None else None
            frames = None
            if self.speech_encoder is not None:
                t1 = _now_ms()
                frames = self.speech_encoder.segment_frames(audio)
                timing["speech_encoder"] = _now_ms() - t1
            analysis = Analysis(
                audio=audio,
                transcript=tr,
                text=text,
                timing_ms=timing,
                speech_frames=frames,
                word_vectors=vectors,
            )
            out.append(analysis)
        return out

    def analyze_batch(self, audios: Sequence[np.ndarray]) -> list[Analysis]:
        audios = [np.ascontiguousarray(a, dtype=np.float32).reshape(-1) for a in audios]
        return self.finish_batch(audios, self.transcribe_batch(audios))

    def analyze(self, audio: np.ndarray) -> Analysis:
        """One utterance (16-kHz mono float32, <= 30 s) -> everything the models read."""
        return self.analyze_batch([audio])[0]
