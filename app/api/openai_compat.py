"""``POST /v1/audio/transcriptions``: OpenAI's transcription endpoint, with emotion added.

An OpenAI client pointed at this server (``OpenAI(base_url="http://host:8000/v1", api_key=KEY)``)
transcribes with ``client.audio.transcriptions.create(model="whisper-1", file=...)``. The audio
takes the same path as ``/v1/predict`` (``app.api.predict.run_analysis``: admission, limits,
isolated decoding, the utterance cut, batched ASR, the emotion models), mixed to one channel.

Multipart fields (OpenAI's names):

* ``file`` (required): the audio, any format ``/v1/predict`` takes.
* ``model``: ``whisper-1`` or the server's ASR model name (``tiny.en`` when bundled); the server
  runs its one ASR model whichever is named (others are 400 ``model_not_found``). Optional here.
* ``language``: ISO-639-1; accepted when it is the server's ASR language (or when the server
  detects the language, then ignored); another is 400 ``unsupported_language``: the language is
  part of the features the emotion models were trained on.
* ``prompt``, ``temperature`` (0..1): accepted and ignored, for the same reason; decoding is
  always the server's (temperature 0, reported as such).
* ``response_format``: ``json`` (default: ``{"text"}``), ``text``, ``srt``, ``vtt``,
  ``verbose_json`` (``task, language, duration, text, segments[...]``, and ``words`` when asked).
* ``timestamp_granularities[]``: ``segment`` and/or ``word``, with ``verbose_json`` only (as
  OpenAI). Segments are always returned; ``word`` adds the top-level ``words``.

Additions to OpenAI's shape (its clients keep unknown fields): each ``verbose_json`` segment has
``emotion`` (result shape v2, the weighted ensemble of every loaded model) and ``text_sentiment``
(VADER on its text); the response has the whole input's ``emotion`` and ``text_sentiment``, and
each word its ``confidence``. A segment is one utterance (``app.analysis.segmenter``), so
``seek`` is its start in 10-ms frames, ``tokens`` its Whisper text tokens, ``avg_logprob`` and
``no_speech_prob`` the decoder's, ``compression_ratio`` Whisper's (text bytes / zlib bytes).
Audio without speech gives an empty transcript (200), as OpenAI does, not ``no_speech``.

Errors on this route have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``
(``code`` is this server's error code), with the statuses and ``Retry-After`` of the rest of the
API; the openai client maps the status to its exception and retries 429/5xx. Auth is the same
``Authorization: Bearer <key>`` the client sends.

Thread-safety: stateless handlers; the work runs where ``/v1/predict``'s does.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from app.api import errors as api_errors
from app.api.predict import PredictOptions, run_analysis
from app.api.upload import Upload
from app.errors import BadRequestError, NoSpeechError
from app.schemas import Emotion, PredictResponse, TextSentiment, UtteranceResult, WordsOnRequest

PATH = "/v1/audio/transcriptions"
OPENAI_MODEL = "whisper-1"
FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")
# verbose_json names the language as Whisper does; codes not listed are returned as they are
LANGUAGE_NAMES = {
    "en": "english",
    "de": "german",
    "es": "spanish",
    "fr": "french",
    "it": "italian",
    "pt": "portuguese",
    "nl": "dutch",
    "pl": "polish",
    "ru": "russian",
    "uk": "ukrainian",
    "tr": "turkish",
    "sv": "swedish",
    "ar": "arabic",
    "hi": "hindi",
    "zh": "chinese",
    "ja": "japanese",
    "ko": "korean",
}


class OpenAIParamError(BadRequestError):
    """A form field this route refuses (400), naming the field as OpenAI's ``param``."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


# --- the response shapes ---------------------------------------------------------------------


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float
    confidence: float = Field(description="addition: Whisper's word probability")


class TranscriptionSegment(BaseModel):
    id: int
    seek: int = Field(description="start of the utterance in 10-ms frames")
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    emotion: Emotion = Field(description="addition: VOICE emotion of the segment (result shape v2)")
    text_sentiment: TextSentiment | None = Field(description="addition: TEXT sentiment (VADER)")


class Transcription(BaseModel):
    """``response_format=json``."""

    text: str


class VerboseTranscription(WordsOnRequest):
    """``response_format=verbose_json``."""

    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    words: list[TranscriptionWord] | None = Field(
        None, description="with `timestamp_granularities[]=word` only"
    )
    emotion: Emotion | None = Field(description="addition: VOICE emotion of the whole input")
    text_sentiment: TextSentiment | None = Field(description="addition: TEXT sentiment of the transcript")


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


# --- errors in OpenAI's shape ------------------------------------------------------------------

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_PASS_HEADERS = ("retry-after", "www-authenticate")


def openai_error(exc: BaseException) -> JSONResponse:
    """The project's error response for ``exc`` (same status, code, logging, metrics and
    Retry-After), in OpenAI's shape."""
    ours = api_errors.error_response(exc)
    body = json.loads(bytes(ours.body))
    status = ours.status_code
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = OpenAIError(
        message=body["detail"], type=kind, param=getattr(exc, "param", None), code=body["error"]
    )
    headers = {k: v for k, v in ours.headers.items() if k.lower() in _PASS_HEADERS}
    return JSONResponse({"error": error.model_dump()}, status_code=status, headers=headers or None)


class OpenAIRoute(APIRoute):
    """Answers every failure of the route, its dependencies (API key) included, in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return openai_error(exc)

        return handle


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


# --- the request -------------------------------------------------------------------------------


class TranscriptionForm(BaseModel):
    """The validated OpenAI form fields."""

    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    granularities: tuple[str, ...] = ("segment",)

    @property
    def words(self) -> bool:
        return "word" in self.granularities


def asr_model_name(settings) -> str:
    """The ASR model's name (``tiny.en``, ``base``) or its directory's name."""
    from pathlib import Path

    from app.analysis.analyzer import AnalyzerSpec

    return Path(AnalyzerSpec.from_settings(settings).asr_name()).name


def parse_form(upload: Upload, settings) -> TranscriptionForm:
    fields = upload.fields
    model = fields.get("model", "").strip()
    accepted = (OPENAI_MODEL, asr_model_name(settings))
    if model and model not in accepted:
        raise OpenAIParamError(
            f"model {model!r} is not served here; use {' or '.join(accepted)}", "model", "model_not_found"
        )
    language = fields.get("language", "").strip().lower()
    fixed = (settings.asr_language or "").lower()
    if language and fixed and language != fixed:
        raise OpenAIParamError(
            f"this server transcribes {fixed!r} only (the emotion models are trained on its features)",
            "language",
            "unsupported_language",
        )
    if "temperature" in fields:
        try:
            temperature = float(fields["temperature"])
        except ValueError:
            temperature = float("nan")
        if not 0.0 <= temperature <= 1.0:
            raise OpenAIParamError("temperature must be a number between 0 and 1", "temperature")
    if fields.get("stream", "false").strip().lower() not in ("", "false", "0"):
        raise OpenAIParamError("streaming transcription is not offered here; use WS /v1/stream", "stream")
    fmt = fields.get("response_format", "json").strip() or "json"
    if fmt not in FORMATS:
        raise OpenAIParamError(
            f"response_format must be one of {', '.join(FORMATS)}", "response_format", "unsupported_value"
        )
    asked = [
        g.strip()
        for key in ("timestamp_granularities[]", "timestamp_granularities")
        for value in upload.lists.get(key, [])
        for g in value.split(",")
        if g.strip()
    ]
    bad = sorted(set(asked) - set(GRANULARITIES))
    if bad:
        raise OpenAIParamError(
            f"timestamp_granularities: unknown {', '.join(bad)}; use word and/or segment",
            "timestamp_granularities",
        )
    if asked and fmt != "verbose_json":
        raise OpenAIParamError(
            "response_format must be set verbose_json to use timestamp granularities",
            "timestamp_granularities",
        )
    return TranscriptionForm.model_validate(
        {"response_format": fmt, "granularities": tuple(dict.fromkeys(asked or ["segment"]))}
    )


# --- rendering ---------------------------------------------------------------------------------


def compression_ratio(text: str) -> float:
    """Whisper's: UTF-8 bytes over zlib-compressed bytes (above 2.4 suggests a repetition loop)."""
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(results: list[UtteranceResult], fmt: Literal["srt", "vtt"]) -> str:
    """One cue per utterance with text (an utterance the ASR heard nothing in has no cue)."""
    cues = [u for u in results if u.text.strip()]
    if fmt == "vtt":
        body = "".join(
            f"{_timestamp(u.start, '.')} --> {_timestamp(u.end, '.')}\n{u.text.strip()}\n\n" for u in cues
        )
        return "WEBVTT\n\n" + body
    return "".join(
        f"{i}\n{_timestamp(u.start, ',')} --> {_timestamp(u.end, ',')}\n{u.text.strip()}\n\n"
        for i, u in enumerate(cues, start=1)
    )


def verbose(response: PredictResponse, results: list[UtteranceResult], form: TranscriptionForm) -> dict:
    segments = [
        TranscriptionSegment(
            id=i,
            seek=int(round(u.start * 100)),
            start=u.start,
            end=u.end,
            text=u.text,
            tokens=list(u.decoding.tokens) if u.decoding else [],
            temperature=0.0,
            avg_logprob=u.decoding.avg_logprob if u.decoding else 0.0,
            compression_ratio=compression_ratio(u.text),
            no_speech_prob=u.decoding.no_speech_prob if u.decoding else 0.0,
            emotion=u.emotion,
            text_sentiment=u.text_sentiment,
        )
        for i, u in enumerate(results)
    ]
    words = (
        [
            TranscriptionWord(word=w.word, start=w.start, end=w.end, confidence=w.confidence)
            for u in results
            for w in u.words
        ]
        if form.words
        else None
    )
    body = VerboseTranscription(
        language=LANGUAGE_NAMES.get(response.language, response.language),
        duration=response.duration_s,
        text=response.transcript,
        segments=segments,
        words=words,
        emotion=response.emotion,
        text_sentiment=response.text_sentiment,
    )
    return body.model_dump(mode="json")


def render(form: TranscriptionForm, response: PredictResponse, results: list[UtteranceResult]) -> Response:
    fmt = form.response_format
    if fmt == "json":
        return JSONResponse(Transcription(text=response.transcript).model_dump())
    if fmt == "verbose_json":
        return JSONResponse(verbose(response, results, form))
    if fmt == "text":
        return PlainTextResponse(response.transcript + "\n")
    return PlainTextResponse(subtitles(results, fmt))


def _silence(settings, duration_s: float | None) -> PredictResponse:
    """The response for audio without speech: an empty transcript, as OpenAI answers."""
    return PredictResponse(
        duration_s=round(duration_s or 0.0, 3),
        transcript="",
        language=settings.asr_language or "",
        segments=[],
        emotion=None,
        text_sentiment=None,
        models=[],
        timing_ms={},
    )


_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "the audio"},
                        "model": {"type": "string", "description": f"`{OPENAI_MODEL}` or the ASR model name"},
                        "language": {"type": "string", "description": "ISO-639-1; the server's own only"},
                        "prompt": {"type": "string", "description": "ignored"},
                        "response_format": {"type": "string", "enum": list(FORMATS), "default": "json"},
                        "timestamp_granularities[]": {
                            "type": "array",
                            "items": {"type": "string", "enum": list(GRANULARITIES)},
                            "description": "with verbose_json only; `word` adds `words`",
                        },
                        "temperature": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 1,
                            "description": "ignored",
                        },
                    },
                }
            }
        },
    }
}
_ERROR = {"model": OpenAIErrorBody}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`json` / `verbose_json`: JSON; `text`, `srt`, `vtt`: text/plain",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    400: {**_ERROR, "description": "a bad field (`param` names it), missing file, unknown model"},
    401: {**_ERROR, "description": "missing or wrong API key"},
    403: {**_ERROR, "description": "browser request from an origin not allowed"},
    413: {**_ERROR, "description": "upload or audio too long"},
    415: {**_ERROR, "description": "not decodable as audio"},
    422: {**_ERROR, "description": "bad audio (`empty_audio`, too many channels, ...)"},
    429: {**_ERROR, "description": "rate limited (Retry-After)"},
    503: {**_ERROR, "description": "loading or overloaded (Retry-After)"},
}


@router.post(
    PATH,
    response_model=Transcription | VerboseTranscription,
    responses=_RESPONSES,
    openapi_extra=_BODY,
    summary="OpenAI-compatible transcription, with emotion",
    description="OpenAI's `POST /v1/audio/transcriptions` (multipart `file`, `model`, `response_format` "
    "json|text|srt|vtt|verbose_json, `timestamp_granularities[]`). `verbose_json` segments add `emotion` "
    "(result shape v2) and `text_sentiment`. Errors: `{error: {message, type, param, code}}`.",
)
async def create_transcription(request: Request) -> Response:
    settings = request.app.state.settings
    parsed: list[TranscriptionForm] = []

    def parse(upload: Upload) -> PredictOptions:
        parsed.append(parse_form(upload, settings))
        return PredictOptions(channels="mix", segmentation="utterance", words=False)

    try:
        response, results = await run_analysis(request, parse)
    except NoSpeechError as exc:
        response, results = _silence(settings, exc.duration_s), []
    return render(parsed[0], response, results)
