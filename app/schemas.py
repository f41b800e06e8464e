"""Response and message schemas shared by REST, WebSocket streaming and the session store.

Result shape v2 (API 2.0): an ``Emotion`` carries ``label``, ``score`` (the probability of the
label), ``ranking`` (every class, most probable first), ``probabilities`` and ``per_model`` (one
entry per model that ran; the ensemble is the top level, never a ``per_model`` entry). A segment
carries its ``role`` (from ``roles=...``, index = channel), the voice ``emotion`` and the
``text_sentiment`` of its transcript (VADER, ``app.analysis.sentiment``), and ``words`` only when
they were asked for (the key is absent otherwise, not an empty list).

Thread-safety: plain pydantic models; instances are not shared between requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer, model_validator


class WordOut(BaseModel):
    word: str
    start: float = Field(description="seconds from the start of the input")
    end: float
    confidence: float = Field(ge=0.0, le=1.0, description="Whisper word probability")


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="probability of `label`, 0..1")


def rank(probabilities: Mapping[str, float]) -> list[LabelScore]:
    """Every class, most probable first (ties keep the classes' order, as argmax does)."""
    ordered = sorted(probabilities.items(), key=lambda kv: -kv[1])
    return [LabelScore(label=k, score=float(v)) for k, v in ordered]


def _derive_label_and_score(data: Any) -> Any:
    """Fill ``label``/``score`` from ``probabilities`` when a producer gave only those (a 1.x
    stored result, a test double), so every reader sees the v2 fields."""
    if not isinstance(data, dict) or not data.get("probabilities"):
        return data
    probs = data["probabilities"]
    data = dict(data)
    if "label" not in data:
        data["label"] = max(probs, key=probs.get)
    if "score" not in data:
        data["score"] = float(probs.get(data["label"], 0.0))
    return data


class ModelEmotion(BaseModel):
    """One model's output."""

    label: str = Field(description="argmax of `probabilities`")
    score: float = Field(description="probability of `label`, 0..1")
    probabilities: dict[str, float]

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        return _derive_label_and_score(data)

    @classmethod
    def of(cls, probabilities: Mapping[str, float]) -> ModelEmotion:
        top = rank(probabilities)[0]
        return cls(label=top.label, score=top.score, probabilities=dict(probabilities))


class Emotion(BaseModel):
    """Voice emotion of an utterance (or a whole input): the weighted ensemble of the requested
    models at the top level, each model's own output in ``per_model``."""

    label: str = Field(description="most probable class of the ensemble (argmax of `probabilities`)")
    score: float = Field(description="probability of `label`, 0..1")
    ranking: list[LabelScore] = Field(description="every class with its probability, most probable first")
    probabilities: dict[str, float] = Field(
        description="ensemble: the weighted mean of the requested models (`models/ensemble.json`), sums to 1"
    )
    per_model: dict[str, ModelEmotion] = Field(
        default_factory=dict, description="each requested model's own output (no `ensemble` entry)"
    )

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        data = _derive_label_and_score(data)
        if isinstance(data, dict) and "ranking" not in data and data.get("probabilities"):
            data["ranking"] = rank(data["probabilities"])
        return data

    @classmethod
    def of(
        cls, probabilities: Mapping[str, float], per_model: Mapping[str, ModelEmotion] | None = None
    ) -> Emotion:
        ranking = rank(probabilities)
        return cls(
            label=ranking[0].label,
            score=ranking[0].score,
            ranking=ranking,
            probabilities=dict(probabilities),
            per_model=dict(per_model or {}),
        )


SentimentLabel = Literal["positive", "neutral", "negative"]


class TextSentiment(BaseModel):
    """Sentiment of the TRANSCRIPT's words (not of the voice): VADER 3.3.2 with its standard
    thresholds, ``compound >= 0.05`` positive, ``<= -0.05`` negative, else neutral."""

    label: SentimentLabel
    compound: float = Field(ge=-1.0, le=1.0, description="VADER's normalised score, -1 (negative) .. 1")
    pos: float = Field(ge=0.0, le=1.0, description="share of the text that is positive")
    neu: float = Field(ge=0.0, le=1.0)
    neg: float = Field(ge=0.0, le=1.0)
    source: Literal["vader"] = "vader"


class WordsOnRequest(BaseModel):
    """Base of the results that carry ``words`` only when asked: ``None`` is serialised as an
    absent key (not null), and the JSON schema keeps the subclass's fields. A subclass names more
    such optional keys in ``absent_when_none`` (e.g. a stream final's ``adaptation``)."""

    absent_when_none: ClassVar[tuple[str, ...]] = ("words",)

    @model_serializer(mode="wrap")
    def _drop_absent_words(self, handler: SerializerFunctionWrapHandler):  # no return type: keeps the schema
        out = handler(self)
        if isinstance(out, dict):
            for key in self.absent_when_none:
                if key in out and out[key] is None:
                    del out[key]
        return out


class Adaptation(BaseModel):
    """Per-session adaptation of a stream final (``start.adapt``): the encoder frames were shifted
    with the running statistics of this many earlier final utterances of the channel (0 = none
    yet: the result equals an unadapted one), shrunk to the population (``app.analysis.adaptation``)."""

    utterances: int = Field(ge=0, description="earlier final utterances of this channel in the statistics")


class SegmentOut(WordsOnRequest):
    channel: int = Field(0, description="0 = mix or left (agent), 1 = right (customer)")
    role: str | None = Field(
        None, description="the channel's name from `roles=` (index = channel); null without"
    )
    start: float = Field(description="seconds from the start of the input")
    end: float
    text: str
    emotion: Emotion = Field(description="VOICE emotion (the emotion models)")
    text_sentiment: TextSentiment | None = Field(
        None, description="TEXT sentiment of `text` (VADER); null when there is no text"
    )
    words: list[WordOut] | None = Field(
        None, description="this segment's words; present only with `words=true`"
    )


def role_of(roles: list[str] | tuple[str, ...] | None, channel: int) -> str | None:
    """The role of ``channel`` in ``roles`` (index = channel); None when not named."""
    return roles[channel] if roles and 0 <= channel < len(roles) else None


class ModelInfo(BaseModel):
    id: str
    variant: str
    sha256: str


class Timing(BaseModel):
    decode: float = 0.0
    asr: float = 0.0
    features: float = 0.0
    inference: float = 0.0
    total: float = 0.0


class PredictResponse(BaseModel):
    duration_s: float
    transcript: str
    language: str
    segments: list[SegmentOut] = Field(default_factory=list)
    emotion: Emotion | None = Field(
        description="VOICE emotion of the whole input: duration-weighted mean over segments; null without speech"
    )
    text_sentiment: TextSentiment | None = Field(
        None,
        description="TEXT sentiment of the whole transcript: the mean of the segments' VADER scores "
        "(segments without text left out); null when there is no text",
    )
    models: list[ModelInfo]
    timing_ms: Timing
    session_id: str | None = None
    seq: list[int] | None = Field(None, description="sequence numbers of the stored results, with session_id")


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. unsupported_audio")
    detail: str = Field(description="what was wrong, for a human")


class AsrDecoding(BaseModel):
    """Whisper's decoding statistics of one utterance (reported by the OpenAI-compatible route; not stored)."""

    tokens: list[int] = Field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0


class UtteranceResult(BaseModel):
    """One analysed utterance (what ``EmotionService.analyze_utterance`` returns to REST and streaming).

    Times are absolute: seconds from the start of the input or stream (``offset_s`` added).
    ``to_store()`` gives the dict appended to the session store (result shape v2; the store keeps
    the words always, its readers drop them unless asked).
    """

    channel: int = 0
    role: str | None = None
    start: float
    end: float
    text: str
    language: str
    words: list[WordOut] = Field(default_factory=list)
    emotion: Emotion
    text_sentiment: TextSentiment | None = None
    timing_ms: Timing
    decoding: AsrDecoding | None = None

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def to_segment(self, include_words: bool = False) -> SegmentOut:
        return SegmentOut(
            channel=self.channel,
            role=self.role,
            start=self.start,
            end=self.end,
            text=self.text,
            emotion=self.emotion,
            text_sentiment=self.text_sentiment,
            words=list(self.words) if include_words else None,
        )

    def to_store(self, **extra) -> dict:
        return {
            "channel": self.channel,
            "role": self.role,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "language": self.language,
            "words": [w.model_dump() for w in self.words],
            "emotion": self.emotion.model_dump(),
            "text_sentiment": self.text_sentiment.model_dump() if self.text_sentiment is not None else None,
            **extra,
        }
