"""``WS /v1/stream``: real-time transcription and emotion of live audio.

Protocol (JSON text messages, each with a ``type``; audio in binary messages)::

    client                                   server
    {"type":"start", sample_rate, encoding,  -> {"type":"ready", session_id, settings, ...}
     channels, models?, session_id?,
     metadata?, partials?}
    <binary audio frame> ...                 -> {"type":"partial", channel, utterance, confirmed, unconfirmed}
                                             -> {"type":"final", seq, channel, start, end, text, words,
                                                 emotion, latency_ms, reason}
                                             -> {"type":"interim", channel, emotion}   (if enabled)
                                             -> {"type":"warning", code, detail}
    {"type":"ping", id?}                     -> {"type":"pong", id}
    {"type":"stop"}                          -> remaining finals, then {"type":"end", stats}; close 1000

* ``encoding``: ``pcm_s16le`` or ``f32le``, channels interleaved; any ``sample_rate`` within the
  server's limits (resampled to 16 kHz). Stereo calls: left = agent (channel 0), right =
  customer (channel 1); each channel is segmented on its own and every result names its channel.
* Binary frames of any length up to ``max_frame_bytes`` (20-100 ms is typical; a frame need not
  end on a sample boundary).
* ``partial``: per channel and utterance; ``confirmed`` only ever grows within an utterance
  (LocalAgreement-2), ``unconfirmed`` may change. Partials are skipped when the ASR lane
  sheds them under load; ``final`` never is (finals have priority and queue room of their own).
  The ``final`` is the authoritative transcript of the utterance.
* ``final``: one per utterance, ended by end of speech (``end_silence_ms`` of silence) or
  ``max_utterance_s``; ``seq`` is its number in the session store (``GET /v1/sessions/{id}``).
  ``latency_ms`` counts from the arrival of the frame in which the utterance's speech ended.
* A client faster than real time gets a ``warning`` (``client_too_fast``); the server keeps its own
  pace and, beyond ``max_backlog_s`` of audio awaiting analysis, stops reading the socket
  (``warning`` ``backpressure``) so TCP flow control slows the client. Nothing is dropped.
* A disconnect, idle timeout or error mid-utterance still finalises and stores what was received.
  Nothing is read after ``stop``: audio sent after it is ignored.
* ``session_id`` of an existing session continues it (numbering goes on); times and utterance
  indexes are those of the current connection. One live stream per session id per server.
* Keep-alive: uvicorn sends WebSocket pings (``--ws-ping-interval``, 20 s); clients that cannot
  answer them may send ``{"type":"ping"}``. ``idle_timeout_s`` without any client message
  (time spent paused by back-pressure excluded) ends the stream.
* Auth: the /v1 API key, as ``Authorization: Bearer <key>`` or ``?api_key=<key>`` (browsers).

Close codes (the close reason is JSON ``{"error", "detail"}``, cut to 123 bytes; the same error is
sent first as an ``error`` message with the full detail):

====  =========================  ===========================================================
code  error                      when
====  =========================  ===========================================================
1000  (normal)                   after ``end``, following the client's ``stop``
1003  unsupported_data           unsupported encoding, sample rate, channel count, or an
                                 unknown message ``type``
1007  invalid_payload            bad JSON, invalid ``start`` fields (types, unknown model, bad
                                 session id), NaN/inf in f32le audio
1008  unauthorized               missing or wrong API key
1008  frame_too_large            binary frame over ``max_frame_bytes``
1009  message_too_big            JSON message over ``max_message_bytes`` (uvicorn also closes
                                 1009 itself beyond its ``ws_max_size``)
1011  internal_error             unexpected server failure
1013  overloaded / not_ready     too many streams, or the models are still loading: retry later
4000  audio_before_start         binary frame (or ``stop``) before ``start``
4001  duplicate_start            a second ``start``
4008  idle_timeout               no client message for ``idle_timeout_s``
4009  session_busy               another live stream on this server uses that ``session_id``
====  =========================  ===========================================================

Thread-safety: one coroutine (the endpoint) reads the socket; sends from the session's tasks are
serialised by a lock. ``_LIVE`` is process state touched only from the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import APIRouter
from pydantic import ValidationError
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app import metrics
from app.api.auth import check_api_key
from app.errors import UnauthorizedError
from app.streaming.audio import InvalidAudioFrame
from app.streaming.protocol import (
    CLIENT_TYPES,
    ENCODINGS,
    ErrorMessage,
    PingMessage,
    PongMessage,
    StartMessage,
    StopMessage,
    client_message,
)
from app.streaming.session import ServiceBackend, StreamSession

log = logging.getLogger(__name__)

router = APIRouter()

NORMAL = 1000
UNSUPPORTED = 1003
INVALID = 1007
POLICY = 1008
TOO_BIG = 1009
INTERNAL = 1011
TRY_LATER = 1013
AUDIO_BEFORE_START = 4000
DUPLICATE_START = 4001
IDLE_TIMEOUT = 4008
SESSION_BUSY = 4009

_LIVE: set[str] = set()  # session ids streaming in this process


class StreamClose(Exception):
    """End the stream with ``code``, after telling the client why."""

    def __init__(self, code: int, error: str, detail: str):
        super().__init__(detail)
        self.code, self.error, self.detail = code, error, detail


def close_reason(error: str, detail: str) -> str:
    """JSON close reason within the 123-byte limit of a close frame."""
    for cut in range(len(detail), -1, -8):
        text = json.dumps({"error": error, "detail": detail[:cut]}, separators=(",", ":"))
        if len(text.encode()) <= 123:
            return text
    return json.dumps({"error": error[:100]})


class _NoStore:
    """Stands in when the server has no session store: results are sent, not kept."""

    async def open_session(self, session_id, metadata=None, source="stream"):
        return {}

    async def append_result(self, session_id, result):
        raise RuntimeError("this server has no session store")

    async def close_session(self, session_id):
        return None


class _Connection:
    """Serialised JSON sends on one socket."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self._lock = asyncio.Lock()

    async def send(self, message) -> None:
        async with self._lock:
            await self.ws.send_text(message.model_dump_json())

    async def close(self, code: int, error: str = "", detail: str = "") -> None:
        if self.ws.application_state == WebSocketState.DISCONNECTED:
            return
        if self.ws.client_state == WebSocketState.DISCONNECTED:
            return
        try:
            async with self._lock:
                await self.ws.close(code, close_reason(error, detail) if error else None)
        except Exception:  # already closed by the peer
            pass


MAX_JSON_DEPTH = 32  # nesting of a client message (metadata included); deeper -> 1007


def _too_deep(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``value`` (parsed JSON) nests containers deeper than ``limit`` (iterative)."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _parse(text: str, limit: int):
    if len(text.encode()) > limit:
        raise StreamClose(TOO_BIG, "message_too_big", f"JSON messages are limited to {limit} bytes")
    try:
        raw = json.loads(text)
    except RecursionError:  # nesting deeper than the parser's recursion limit: malformed, not a fault
        raise StreamClose(INVALID, "invalid_payload", "not JSON: nested too deeply") from None
    except ValueError as exc:
        raise StreamClose(INVALID, "invalid_payload", f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise StreamClose(INVALID, "invalid_payload", "a message must be a JSON object")
    if _too_deep(raw):  # would fail later (storing, echoing metadata) far from the client's mistake
        raise StreamClose(INVALID, "invalid_payload", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    kind = raw.get("type")
    if kind not in CLIENT_TYPES:
        raise StreamClose(
            UNSUPPORTED, "unsupported_data", f"unknown message type {kind!r}; expected one of {CLIENT_TYPES}"
        )
    try:
        return client_message.validate_python(raw)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or kind}: {e['msg']}" for e in exc.errors())
        raise StreamClose(INVALID, "invalid_payload", f"invalid {kind} message: {errors}") from None
    except (RecursionError, ValueError) as exc:  # e.g. metadata nested too deeply for the validator
        detail = f"invalid {kind} message: {type(exc).__name__}"
        raise StreamClose(INVALID, "invalid_payload", detail) from None


def _check_start(start: StartMessage, settings) -> None:
    if start.encoding not in ENCODINGS:
        raise StreamClose(
            UNSUPPORTED,
            "unsupported_data",
            f"encoding {start.encoding!r} is not supported; use one of {sorted(ENCODINGS)}",
        )
    if not settings.min_sample_rate <= start.sample_rate <= settings.max_sample_rate:
        raise StreamClose(
            UNSUPPORTED,
            "unsupported_data",
            f"sample_rate {start.sample_rate} is outside {settings.min_sample_rate}..{settings.max_sample_rate} Hz",
        )
    if start.channels > settings.max_channels:
        raise StreamClose(
            UNSUPPORTED, "unsupported_data", f"{start.channels} channels; at most {settings.max_channels}"
        )


async def _receive(ws: WebSocket, timeout_s: float) -> Message:
    try:
        return await asyncio.wait_for(ws.receive(), timeout_s if timeout_s > 0 else None)
    except asyncio.TimeoutError:
        raise StreamClose(IDLE_TIMEOUT, "idle_timeout", f"no message for {timeout_s:g} s") from None


async def _await_start(ws: WebSocket, conn: _Connection, settings) -> StartMessage:
    while True:
        msg = await _receive(ws, settings.stream_idle_timeout_s)
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        if msg.get("bytes") is not None:
            raise StreamClose(AUDIO_BEFORE_START, "audio_before_start", "send a start message before audio")
        parsed = _parse(msg.get("text") or "", settings.stream_max_message_bytes)
        if isinstance(parsed, PingMessage):
            await conn.send(PongMessage(id=parsed.id))
            continue
        if isinstance(parsed, StopMessage):
            raise StreamClose(AUDIO_BEFORE_START, "audio_before_start", "stop before start")
        return parsed


def _resolve_models(service, start: StartMessage) -> list[str]:
    if not service.ready:
        raise StreamClose(TRY_LATER, "not_ready", "the models are still loading; retry shortly")
    try:
        return ServiceBackend(service).resolve_models(start.models)
    except Exception as exc:
        code = getattr(exc, "code", "")
        if code == "unknown_model":
            raise StreamClose(INVALID, "unknown_model", str(exc)) from None
        if getattr(exc, "status", None) == 503:
            raise StreamClose(TRY_LATER, code or "not_ready", str(exc)) from None
        raise


async def stream_endpoint(ws: WebSocket) -> None:
    """Accept, authenticate, run one stream session, close with the right code."""
    app = ws.app
    settings, service = app.state.settings, app.state.service
    store = getattr(app.state, "store", None) or _NoStore()
    await ws.accept()
    conn = _Connection(ws)
    session: StreamSession | None = None
    session_id: str | None = None
    reason = "disconnect"
    metrics.STREAMS_IN_FLIGHT.inc()
    try:
        try:
            check_api_key(ws)
        except UnauthorizedError as exc:
            raise StreamClose(POLICY, "unauthorized", str(exc)) from None
        if len(_LIVE) >= settings.stream_max_streams:
            raise StreamClose(TRY_LATER, "overloaded", f"{len(_LIVE)} streams are open; retry later")
        start = await _await_start(ws, conn, settings)
        _check_start(start, settings)
        models = _resolve_models(service, start)
        session_id = start.session_id or uuid.uuid4().hex
        if session_id in _LIVE:
            sid, session_id = session_id, None
            raise StreamClose(
                SESSION_BUSY, "session_busy", f"session {sid} is streaming on another connection"
            )
        _LIVE.add(session_id)
        session = StreamSession(
            session_id=session_id,
            start=start,
            settings=settings,
            backend=ServiceBackend(service),
            store=store,
            emit=conn.send,
            models=start.models,
            announced_models=models,
        )
        await session.open()
        reason = await _read_loop(ws, conn, session, settings)
        stats = await session.finish(reason)
        if reason == "stop":
            await session.emit(session.end_message(stats))
            await conn.close(NORMAL)
        else:
            await conn.close(NORMAL)
        log.info("stream %s ended (%s): %s; models %s", session_id, reason, stats.model_dump(), models)
    except WebSocketDisconnect:
        if session is not None:
            session.mark_client_gone()
            await session.finish("disconnect")
    except StreamClose as exc:
        metrics.ERRORS.labels(type=exc.error).inc()
        await _fail(conn, session, exc)
    except Exception as exc:
        log.exception("stream %s failed", session_id)
        metrics.ERRORS.labels(type="internal_error").inc()
        await _fail(
            conn, session, StreamClose(INTERNAL, "internal_error", f"internal error: {type(exc).__name__}")
        )
    finally:
        if session_id is not None:
            _LIVE.discard(session_id)
        metrics.STREAMS_IN_FLIGHT.dec()


async def _fail(conn: _Connection, session: StreamSession | None, exc: StreamClose) -> None:
    """Tell the client, keep what was received (finals still sent), close with the code."""
    message = ErrorMessage(error=exc.error, detail=exc.detail, close_code=exc.code)
    if session is not None:
        await session.emit(message)
        try:
            await session.finish("idle" if exc.code == IDLE_TIMEOUT else "error")
        except Exception:
            log.exception("stream %s: flushing after an error failed", session.session_id)
    else:
        try:
            await conn.send(message)
        except Exception:
            pass
    await conn.close(exc.code, exc.error, exc.detail)


async def _read_loop(ws: WebSocket, conn: _Connection, session: StreamSession, settings) -> str:
    """Read until stop or disconnect; returns the reason. Raises ``StreamClose`` on violations."""
    max_frame = settings.stream_max_frame_bytes
    max_message = settings.stream_max_message_bytes
    while True:
        # Back-pressure: do not read while too much audio awaits analysis (TCP slows the client).
        await session.wait_capacity()
        msg = await _receive(ws, settings.stream_idle_timeout_s)
        arrival = time.monotonic()
        if msg["type"] == "websocket.disconnect":
            session.mark_client_gone()
            return "disconnect"
        data = msg.get("bytes")
        if data is not None:
            if len(data) > max_frame:
                raise StreamClose(
                    POLICY,
                    "frame_too_large",
                    f"binary frames are limited to {max_frame} bytes, got {len(data)}",
                )
            try:
                await session.feed(data, arrival)
            except InvalidAudioFrame as exc:
                raise StreamClose(INVALID, "invalid_payload", str(exc)) from None
            continue
        parsed = _parse(msg.get("text") or "", max_message)
        if isinstance(parsed, StopMessage):
            return "stop"
        if isinstance(parsed, PingMessage):
            await conn.send(PongMessage(id=parsed.id))
            continue
        raise StreamClose(DUPLICATE_START, "duplicate_start", "the stream has already started")


router.add_websocket_route("/v1/stream", stream_endpoint, name="stream")
