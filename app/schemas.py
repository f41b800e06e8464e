"""Response and message schemas shared by REST, WebSocket streaming and the session store."""

from __future__ import annotations

from pydantic import BaseModel, Field


class WordOut(BaseModel):
    word: str
    start: float = Field(description="seconds from the start of the input")
    end: float
    confidence: float = Field(ge=0.0, le=1.0, description="Whisper word probability")


class ModelEmotion(BaseModel):
    label: str
    probabilities: dict[str, float]


class Emotion(BaseModel):
    label: str = Field(description="argmax of `probabilities`")
    probabilities: dict[str, float] = Field(
        description="ensemble (mean over the requested models), sums to 1"
    )
    per_model: dict[str, ModelEmotion] = Field(default_factory=dict)


class SegmentOut(BaseModel):
    start: float
    end: float
    channel: int = Field(0, description="0 = mix or left (agent), 1 = right (customer)")
    text: str
    emotion: Emotion
    words: list[WordOut] = Field(default_factory=list, description="this segment's words (with `words=true`)")


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
    words: list[WordOut] = Field(default_factory=list)
    segments: list[SegmentOut] = Field(default_factory=list)
    emotion: Emotion | None = Field(
        description="whole input: duration-weighted mean over segments; null without speech"
    )
    models: list[ModelInfo]
    timing_ms: Timing
    session_id: str | None = None
    seq: list[int] | None = Field(None, description="sequence numbers of the stored results, with session_id")


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. unsupported_audio")
    detail: str = Field(description="what was wrong, for a human")


class UtteranceResult(BaseModel):
    """One analysed utterance (what ``EmotionService.analyze_utterance`` returns to REST and streaming).

    Times are absolute: seconds from the start of the input or stream (``offset_s`` added).
    ``to_store()`` gives the dict appended to the session store (the shape of a streaming ``final``).
    """

    channel: int = 0
    start: float
    end: float
    text: str
    language: str
    words: list[WordOut] = Field(default_factory=list)
    emotion: Emotion
    timing_ms: Timing

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def to_segment(self, include_words: bool = False) -> SegmentOut:
        return SegmentOut(
            start=self.start,
            end=self.end,
            channel=self.channel,
            text=self.text,
            emotion=self.emotion,
            words=list(self.words) if include_words else [],
        )

    def to_store(self, **extra) -> dict:
        return {
            "channel": self.channel,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "language": self.language,
            "words": [w.model_dump() for w in self.words],
            "emotion": self.emotion.model_dump(),
            **extra,
        }
