"""``WS /v1/stream``: real-time transcription and emotion of live audio.

Protocol (JSON text messages, each with a ``type``; audio in binary messages)::

    client                                   server
    {"type":"start", sample_rate, encoding,  -> {"type":"ready", session_id, settings,
     channels, models?, session_id?,              resume_offset_s, last_seq, ...}
     metadata?, partials?, audio_offset_s?,
     roles?, words?, adapt?}
    <binary audio frame> ...                 -> {"type":"partial", channel, utterance, confirmed, unconfirmed}
                                             -> {"type":"final", seq, channel, role, start, end, text,
                                                 words (only with words=true), emotion,
                                                 text_sentiment, latency_ms, reason,
                                                 adaptation (only with adapt=true)}
                                             -> {"type":"interim", channel, emotion}   (if enabled)
                                             -> {"type":"warning", code, detail}
    {"type":"ping", id?}                     -> {"type":"pong", id}
    {"type":"stop"}                          -> remaining finals, then {"type":"end", stats}; close 1000

* ``encoding``: ``pcm_s16le`` or ``f32le``, channels interleaved; any ``sample_rate`` within the
  server's limits (resampled to 16 kHz). Stereo calls: left = agent (channel 0), right =
  customer (channel 1); each channel is segmented on its own and every result names its channel.
* ``roles``: a name per channel (``["agent", "customer"]``; at most ``channels`` names of 1-32
  characters ``[A-Za-z0-9_.-]``): every ``final`` and stored result carries its channel's ``role``
  and the session keeps them (per-role summary, alert rules by role). A bad list closes 1007.
* ``words`` (default false): finals carry ``words`` (timings, confidences) only when true; the
  session store keeps them either way (``GET /v1/sessions/{id}/results?words=true``).
* ``adapt`` (default false): per-session adaptation (``app.analysis.adaptation``): each channel's
  encoder frames are shifted by the running mean of its earlier finals, shrunk to the population
  statistics beside the models; every final (and stored result) then carries ``adaptation:
  {"utterances": n}``. The state is this connection's only: a resumed session, or one continued
  on another replica, starts again from n = 0.
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
* ``session_id`` of an existing session continues it: numbering goes on, and times go on from the
  session's resume point (``ready.resume_offset_s``: the end of its last stored result, or the
  client's ``audio_offset_s`` when later); utterance indexes restart per connection. The precise
  rules, and how a client resumes after a lost connection, are in ``app.streaming.protocol``.
* One live stream per session, across every replica sharing the store: the stream holds the
  session's lease (``app.store.lease``; Redis ``SET NX PX``, renewed by the stream's heartbeat every
  third of ``EMOTION_STREAM_LEASE_TTL_S``, released on the stream's end). A second stream on the
  session is closed 4009 ``session_busy`` with ``retry_after_s`` (when the holder's lease expires
  unless renewed). A lease whose holder died (its replica was killed) expires after the TTL and
  the next stream takes it over: that is how a client resumes on another replica. A stream whose
  lease was taken over (it could not renew in time) is closed 4009 too and leaves the session to
  its successor.
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
1003  adaptation_unavailable     ``start.adapt`` but the loaded models ship no usable
                                 ``adaptation.json`` (population statistics)
1007  invalid_payload            bad JSON, invalid ``start`` fields (types, unknown model, bad
                                 session id), NaN/inf in f32le audio
1008  unauthorized               missing or wrong API key
1008  origin_not_allowed         ``Origin`` header not in ``EMOTION_CORS_ORIGINS`` (nor same-origin)
1013  rate_limited               too many wrong keys from this address, or requests with this key
1009  metadata_too_large         ``start.metadata``, merged into the session's, over the cap (16 KiB)
4404  session_not_found          ``session_id`` of another tenant's session (as if it did not exist)
1008  frame_too_large            binary frame over ``max_frame_bytes``
1008  client_not_reading         a send stayed blocked for ``EMOTION_STREAM_SEND_TIMEOUT_S``: the
                                 client does not read (the close frame may never reach it)
1009  message_too_big            JSON message over ``max_message_bytes`` (uvicorn also closes
                                 1009 itself beyond its ``ws_max_size``)
1011  internal_error             unexpected server failure
1013  overloaded / not_ready     too many streams, or the models are still loading: retry later
4000  audio_before_start         binary frame (or ``stop``) before ``start``
4001  duplicate_start            a second ``start``
4008  idle_timeout               no client message for ``idle_timeout_s``
4009  session_busy               another live stream (on any replica) holds the session's lease;
                                 ``retry_after_s`` in the ``error`` message; also sent to a stream
                                 whose lease another stream took over
1013  store_busy /               the session store cannot take the lease now (pool exhausted, Redis
      store_unavailable          down): retry later
====  =========================  ===========================================================

Admission: a stream slot (``stream_max_streams``, ``app.inference.admission.Slots``) is taken in one
step before the endpoint's first wait for the client and released in ``finally``, so a burst of
connections gets exactly the limit. A client that stops reading holds no slot for long: every send
is bounded by ``stream_send_timeout_s``; when one expires the connection is marked stalled, the
reader is woken (its pending receive or back-pressure wait is cancelled) and the stream ends with
``client_not_reading`` after storing what was already analysed.

Thread-safety: one coroutine (the endpoint) reads the socket; sends from the session's tasks are
serialised by a lock. Leases are shared through the store (Redis) or the process (``LocalLeases``).
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
from app.api.auth import Principal, check_api_key, check_origin
from app.api.sessions import SessionNotFoundError, may_use_session, owner_kwargs
from app.errors import ForbiddenOriginError, RateLimitedError, UnauthorizedError
from app.inference import admission as admission_control
from app.observability import SESSION_ID
from app.store.common import MetadataTooLarge, StoreBusy, merged_metadata
from app.store.lease import SessionLease, leases_of, new_owner
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
SESSION_NOT_FOUND = 4404


class StreamClose(Exception):
    """End the stream with ``code``, after telling the client why."""

    def __init__(self, code: int, error: str, detail: str, retry_after_s: float | None = None):
        super().__init__(detail)
        self.code, self.error, self.detail = code, error, detail
        self.retry_after_s = retry_after_s


def close_reason(error: str, detail: str) -> str:
    """JSON close reason within the 123-byte limit of a close frame."""
    for cut in range(len(detail), -1, -8):
        text = json.dumps({"error": error, "detail": detail[:cut]}, separators=(",", ":"))
        if len(text.encode()) <= 123:
            return text
    return json.dumps({"error": error[:100]})


class _NoStore:
    """Stands in when the server has no session store: results are sent, not kept."""

    async def open_session(self, session_id, metadata=None, source="stream", roles=None):
        return {}

    async def append_result(self, session_id, result):
        raise RuntimeError("this server has no session store")

    async def close_session(self, session_id):
        return None


CLOSE_TIMEOUT_S = 1.0  # a close frame queued behind unread data is given up after this


class _Connection:
    """Serialised JSON sends on one socket, each bounded by ``send_timeout_s`` (0 = unbounded).

    A send still blocked at its deadline (the client does not read: the socket buffers are full)
    marks the connection ``stalled``: every later send fails at once, and a reader parked in
    ``watch`` wakes up with ``StreamClose`` (client_not_reading), so the endpoint ends the stream.
    ``abort(exc)`` wakes the reader the same way with another reason (the session's lease was lost).
    """

    def __init__(self, ws: WebSocket, send_timeout_s: float = 0.0):
        self.ws = ws
        self.send_timeout_s = send_timeout_s
        self.stalled = False
        self._aborted: StreamClose | None = None
        self._lock = asyncio.Lock()
        self._stall_signal: asyncio.Future[None] | None = (
            None  # done once stalled or aborted (wakes ``watch``)
        )

    def _not_reading(self) -> StreamClose:
        return StreamClose(
            POLICY, "client_not_reading", f"the client did not read for {self.send_timeout_s:g} s"
        )

    async def _send_locked(self, text: str) -> None:
        async with self._lock:
            await self.ws.send_text(text)

    async def send(self, message) -> None:
        if self.stalled:
            raise self._not_reading()
        text = message.model_dump_json()
        if self.send_timeout_s <= 0:
            await self._send_locked(text)
            return
        try:
            await asyncio.wait_for(self._send_locked(text), self.send_timeout_s)
        except asyncio.TimeoutError:
            self._stall()
            raise self._not_reading() from None

    def _stall(self) -> None:
        if self.stalled:
            return
        self.stalled = True
        log.warning("stream: a send blocked for %g s (client not reading): closing", self.send_timeout_s)
        self._wake()

    def abort(self, exc: StreamClose) -> None:
        """End the stream with ``exc``: the reader raises it at its next (or current) wait."""
        if self._aborted is None:
            self._aborted = exc
        self._wake()

    def _wake(self) -> None:
        if self._stall_signal is not None and not self._stall_signal.done():
            self._stall_signal.set_result(None)

    def _interrupted(self) -> StreamClose | None:
        if self.stalled:
            return self._not_reading()
        return self._aborted

    async def watch(self, awaitable, timeout_s: float | None = None):
        """Await a blocking step of the reader (receive, back-pressure wait), at most ``timeout_s``
        (``asyncio.TimeoutError``); ``StreamClose`` (client_not_reading) as soon as a send stalls."""
        interrupted = self._interrupted()
        if interrupted is not None:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never started
            raise interrupted
        if self._stall_signal is None:
            self._stall_signal = asyncio.get_running_loop().create_future()
        step = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait(
                {step, self._stall_signal}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # cancelled from outside (shutdown)
            step.cancel()
            raise
        if step in done:
            return step.result()
        step.cancel()
        interrupted = self._interrupted()
        if interrupted is not None:
            raise interrupted
        raise asyncio.TimeoutError

    async def _close_locked(self, code: int, reason: str | None) -> None:
        async with self._lock:
            await self.ws.close(code, reason)

    async def close(self, code: int, error: str = "", detail: str = "") -> None:
        if self.ws.application_state == WebSocketState.DISCONNECTED:
            return
        if self.ws.client_state == WebSocketState.DISCONNECTED:
            return
        # bounded: a close frame cannot pass a client that does not read
        timeout = CLOSE_TIMEOUT_S if self.stalled else (self.send_timeout_s or None)
        try:
            await asyncio.wait_for(
                self._close_locked(code, close_reason(error, detail) if error else None), timeout
            )
        except Exception:  # already closed by the peer, or it does not read
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


async def _receive(ws: WebSocket, timeout_s: float, conn: _Connection | None = None) -> Message:
    """The next message within ``timeout_s`` (idle timeout); with ``conn``, also woken by a stalled send."""
    timeout = timeout_s if timeout_s > 0 else None
    try:
        if conn is None:
            return await asyncio.wait_for(ws.receive(), timeout)
        return await conn.watch(ws.receive(), timeout)
    except asyncio.TimeoutError:
        raise StreamClose(IDLE_TIMEOUT, "idle_timeout", f"no message for {timeout_s:g} s") from None


async def _await_start(ws: WebSocket, conn: _Connection, settings) -> StartMessage:
    while True:
        msg = await _receive(ws, settings.stream_idle_timeout_s, conn)
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


class _TenantStore:
    """The store as one stream sees it: a session it creates belongs to the caller's tenant."""

    def __init__(self, store, principal: Principal):
        self._store, self._owner = store, owner_kwargs(principal)

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def open_session(self, session_id, metadata=None, source="stream", **kwargs):
        return await self._store.open_session(session_id, metadata, source=source, **self._owner, **kwargs)


async def _check_session(store, session_id: str, principal: Principal, start: StartMessage, settings) -> None:
    """Another tenant's session: 4404 (as if unknown). Metadata over the cap, alone or merged into
    the stored one: 1009 (too big for the server to keep, like an oversized message)."""
    try:
        view = await may_use_session(store, session_id, principal)
    except SessionNotFoundError as exc:
        raise StreamClose(SESSION_NOT_FOUND, exc.code, str(exc)) from None
    cap = int(getattr(settings, "store_max_metadata_bytes", 0))
    try:
        merged_metadata((view or {}).get("metadata") or {}, start.metadata, cap)
    except MetadataTooLarge as exc:
        raise StreamClose(TOO_BIG, exc.code, str(exc)) from None


async def _take_lease(store, session_id: str, settings) -> SessionLease:
    """The session's lease for this connection, or ``StreamClose`` 4009 (busy) / 1013 (store)."""
    ttl_s = float(getattr(settings, "stream_lease_ttl_s", 10.0))
    lease = SessionLease(leases_of(store), session_id, new_owner(), ttl_s)
    try:
        grant = await lease.acquire()
    except StoreBusy as exc:
        raise StreamClose(TRY_LATER, exc.code, str(exc)) from None
    except Exception as exc:  # Redis down or unreachable: not the client's fault, retry later
        log.warning("stream %s: the session store cannot take the lease: %s", session_id, exc)
        detail = f"the session store is unavailable ({type(exc).__name__}); retry later"
        raise StreamClose(TRY_LATER, "store_unavailable", detail) from None
    if not grant.acquired:
        raise StreamClose(
            SESSION_BUSY,
            "session_busy",
            f"session {session_id} is streaming on another connection; its lease expires in "
            f"{grant.expires_in_s:g} s unless renewed",
            retry_after_s=grant.expires_in_s,
        )
    return lease


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


def _population(service, start: StartMessage):
    """The population statistics for ``start.adapt`` (None without it), or ``StreamClose`` 1003 when
    the loaded models ship none: a stream that asked for adaptation never runs without it."""
    if not start.adapt:
        return None
    from app.service import AdaptationUnavailable

    try:
        return service.adaptation_population()
    except AdaptationUnavailable as exc:
        raise StreamClose(UNSUPPORTED, exc.code, str(exc)) from None


async def stream_endpoint(ws: WebSocket) -> None:
    """Accept, authenticate, run one stream session, close with the right code."""
    app = ws.app
    settings, service = app.state.settings, app.state.service
    store = getattr(app.state, "store", None) or _NoStore()
    await ws.accept()
    conn = _Connection(ws, settings.stream_send_timeout_s)
    slots, has_slot = admission_control.of_app(app).streams, False
    session: StreamSession | None = None
    session_id: str | None = None
    lease: SessionLease | None = None
    reason = "disconnect"
    metrics.STREAMS_IN_FLIGHT.inc()
    try:
        try:
            check_origin(ws)  # a browser page of a foreign origin: 1008 origin_not_allowed
            principal = check_api_key(ws)
        except (UnauthorizedError, ForbiddenOriginError) as exc:
            raise StreamClose(POLICY, exc.code, str(exc)) from None
        except RateLimitedError as exc:
            raise StreamClose(TRY_LATER, exc.code, str(exc)) from None
        has_slot = slots.try_acquire()  # check and count in one step: a burst cannot overshoot
        if not has_slot:
            metrics.ADMISSION_SHED.labels(reason="streams").inc()
            raise StreamClose(TRY_LATER, "overloaded", f"{slots.limit} streams are open; retry later")
        start = await _await_start(ws, conn, settings)
        _check_start(start, settings)
        models = _resolve_models(service, start)
        population = _population(service, start)
        session_id = start.session_id or uuid.uuid4().hex
        SESSION_ID.set(session_id)  # every later log line of this stream (and its tasks) carries it
        await _check_session(store, session_id, principal, start, settings)
        lease = await _take_lease(store, session_id, settings)  # before the session is (re)opened
        session = StreamSession(
            session_id=session_id,
            start=start,
            settings=settings,
            backend=ServiceBackend(service),
            store=_TenantStore(store, principal),
            emit=conn.send,
            models=start.models,
            announced_models=models,
            lease=lease,
            population=population,
            on_lease_lost=lambda: conn.abort(
                StreamClose(
                    SESSION_BUSY,
                    "session_busy",
                    "another stream took this session over (this stream's lease could not be renewed)",
                )
            ),
        )
        await session.open()
        reason = await _read_loop(ws, conn, session, settings)
        stats = await session.finish(reason)
        # Everything is stored: free the session before ``end``, so a client that starts the next
        # stream on it right after ``end`` is not refused 4009 by its own finished stream.
        await _release(lease, session_id)
        lease = None
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
        await _release(
            lease, session_id
        )  # after ``finish`` ended the stored session: a successor re-opens it
        if has_slot:
            slots.release()
        metrics.STREAMS_IN_FLIGHT.dec()


async def _release(lease: SessionLease | None, session_id: str | None) -> None:
    if lease is None:
        return
    try:
        await lease.release()
    except Exception as exc:  # the lease expires by itself
        log.warning("stream %s: could not release the session's lease: %s", session_id, exc)


async def _fail(conn: _Connection, session: StreamSession | None, exc: StreamClose) -> None:
    """Tell the client, keep what was received (finals still sent), close with the code."""
    message = ErrorMessage(
        error=exc.error, detail=exc.detail, close_code=exc.code, retry_after_s=exc.retry_after_s
    )
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
        if session.backlog_s > session.max_backlog_s:  # wait_capacity would block: a stall must end it
            await conn.watch(session.wait_capacity())
        msg = await _receive(ws, settings.stream_idle_timeout_s, conn)
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
