"""Typed messages of the ``WS /v1/stream`` protocol (see ``app.api.stream`` for the full protocol).

Client -> server JSON: ``start``, ``stop``, ``ping``; audio travels in binary frames.
Server -> client JSON: ``ready``, ``partial``, ``final``, ``interim``, ``warning``, ``error``,
``end``, ``pong``. Every message has a ``type``; times (``start``, ``end``) are seconds of audio
on the *session's* timeline.

Session timeline and resume: a new session starts at 0. A connection that names an existing
``session_id`` continues it (after a network failure, a replica crash, or simply later): the
server reads the session's *resume point* ``R``, the largest ``end`` of its stored results
(``audio_duration_s`` of ``GET /v1/sessions/{id}``: every final a client ever received is stored
before it is sent, so ``R`` is at or after the end of every acknowledged final), and places this
connection's first audio frame at ``resume_offset_s = max(R, start.audio_offset_s or 0)``, which
``ready`` reports. Every time of this connection (results, words, partials, interims) is that
offset plus the audio time within the connection, so times keep increasing across connections.
A client that kept its audio (a file, a buffered source) resends from ``resume_offset_s``; the
audio between its last acknowledged final and the crash is analysed again, and nothing stored is
analysed twice. A live source that cannot resend sets ``audio_offset_s`` to the time of the frame
it sends next; the audio lost in between is a gap in the timeline. ``seq`` continues from the
session's ``last_seq`` (reported in ``ready``): finals numbered up to ``last_seq`` that the client
never received were stored by the previous connection and can be read with
``GET /v1/sessions/{id}/results?after=<last seq received>``. ``utterance`` indexes restart at 0
with each connection. With two channels, ``R`` is the largest end of either channel.

``start.roles`` names the channels (index = channel, e.g. ``["agent", "customer"]``: at most
``channels`` names of ``ROLE_PATTERN``); each ``final`` and stored result then carries its
``role``, and the session keeps them (summaries and alert rules are per role). ``start.words``
(default false) asks for the word timings in ``final``; the session store keeps them either way.
``start.adapt`` (default false) turns on per-session adaptation (``app.analysis.adaptation``): each
``final`` then carries ``adaptation.utterances``, the number of earlier finals of its channel whose
statistics normalised it; the state belongs to the connection, so a resumed session starts from 0.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from app.schemas import Adaptation, Emotion, TextSentiment, WordOut, WordsOnRequest

ENCODINGS = {"pcm_s16le": 2, "f32le": 4}  # bytes per sample
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
ROLE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
PROTOCOL_VERSION = 1


# --- client messages -------------------------------------------------------------------------


class StartMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["start"]
    sample_rate: int = Field(16000, gt=0, description="Hz of the binary frames")
    encoding: str = Field("pcm_s16le", description="pcm_s16le | f32le, interleaved when channels > 1")
    channels: int = Field(1, ge=1, description="1 = mono; 2 = stereo call (left agent, right customer)")
    models: list[str] | None = Field(None, description="emotion models; null = the server's default set")
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN, description="null = a new id")
    metadata: dict[str, Any] | None = None
    partials: bool = Field(True, description="false: send no partial transcripts")
    audio_offset_s: float | None = Field(
        None,
        ge=0,
        description="session time of this connection's first frame (a live source resuming after a "
        "gap); the server uses max(this, the session's resume point). null = the resume point",
    )
    roles: list[Annotated[str, Field(pattern=ROLE_PATTERN)]] | None = Field(
        None, description='role per channel, e.g. ["agent", "customer"] (at most `channels` names)'
    )
    words: bool = Field(False, description="true: finals carry word timings and confidences")
    adapt: bool = Field(
        False,
        description="true: per-session adaptation: each channel's encoder frames are normalised with the "
        "running mean of its earlier final utterances, shrunk to the population (finals say after how "
        "many); the state lives in this connection only",
    )

    @model_validator(mode="after")
    def _roles_fit_channels(self) -> StartMessage:
        if self.roles is not None and len(self.roles) > self.channels:
            raise ValueError(f"{len(self.roles)} roles for {self.channels} channel(s)")
        return self


class StopMessage(BaseModel):
    type: Literal["stop"]


class PingMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["ping"]
    id: str | int | None = None


ClientMessage = Annotated[StartMessage | StopMessage | PingMessage, Field(discriminator="type")]
client_message = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("start", "stop", "ping")


# --- server messages -------------------------------------------------------------------------


class StreamSettings(BaseModel):
    """Limits and behaviour in force for this stream, echoed in ``ready``."""

    max_frame_bytes: int
    max_message_bytes: int
    max_utterance_s: float
    end_silence_ms: int
    partial_every_s: float
    interim_every_s: float
    max_backlog_s: float
    idle_timeout_s: float


class ReadyMessage(BaseModel):
    type: Literal["ready"] = "ready"
    protocol: int = PROTOCOL_VERSION
    session_id: str
    sample_rate: int
    encoding: str
    channels: int
    models: list[str]
    settings: StreamSettings
    resume_offset_s: float = Field(
        0.0, description="session time of this connection's first audio frame (0 for a new session)"
    )
    last_seq: int = Field(0, description="the session's last stored result when this connection began")


class PartialMessage(BaseModel):
    type: Literal["partial"] = "partial"
    session_id: str
    channel: int
    utterance: int = Field(description="index of the utterance within its channel, from 0")
    start: float
    end: float = Field(description="audio time the hypothesis covers")
    confirmed: str = Field(description="agreed by two consecutive hypotheses; only ever grows")
    unconfirmed: str = Field(description="the rest of the latest hypothesis; may change")


class FinalMessage(WordsOnRequest):
    """One utterance's result (result shape v2, as stored), plus the stream's own fields."""

    type: Literal["final"] = "final"
    seq: int | None = Field(description="sequence number in the session store; null if storing failed")
    session_id: str
    channel: int
    role: str | None = Field(None, description="the channel's name from the start message's `roles`")
    utterance: int
    start: float
    end: float
    text: str
    words: list[WordOut] | None = Field(None, description="only when the start message asked for words")
    emotion: Emotion | None
    text_sentiment: TextSentiment | None = Field(None, description="TEXT sentiment of `text` (VADER)")
    reason: Literal["end_of_speech", "max_length", "stop", "disconnect", "idle", "error"]
    latency_ms: float = Field(description="from the arrival of the frame in which the speech ended")
    adaptation: Adaptation | None = Field(
        None, description="only with start.adapt: after how many earlier finals of the channel"
    )

    absent_when_none: ClassVar[tuple[str, ...]] = ("words", "adaptation")


class InterimMessage(BaseModel):
    type: Literal["interim"] = "interim"
    session_id: str
    channel: int
    utterance: int
    start: float
    end: float
    emotion: Emotion | None


class WarningMessage(BaseModel):
    type: Literal["warning"] = "warning"
    code: str = Field(description="client_too_fast | falling_behind | backpressure | store_failed | ...")
    detail: str
    backlog_s: float | None = None


class ErrorMessage(BaseModel):
    type: Literal["error"] = "error"
    error: str = Field(description="machine-readable code, as in the REST error body")
    detail: str
    close_code: int | None = None
    retry_after_s: float | None = Field(
        None, description="when retrying may succeed (session_busy: when the holder's lease expires)"
    )


class EndStats(BaseModel):
    audio_s: float
    utterances: int
    finals: int
    stored: int
    partials_sent: int
    partials_skipped: int
    max_backlog_s: float
    paused_reading_s: float


class EndMessage(BaseModel):
    type: Literal["end"] = "end"
    session_id: str
    stats: EndStats


class PongMessage(BaseModel):
    type: Literal["pong"] = "pong"
    id: str | int | None = None


ServerMessage = (
    ReadyMessage
    | PartialMessage
    | FinalMessage
    | InterimMessage
    | WarningMessage
    | ErrorMessage
    | EndMessage
    | PongMessage
)
