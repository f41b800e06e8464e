"""Server-sent event streams for dashboards: one session's events, and the session list's.

``GET /v1/sessions/{id}/events?after=SEQ&words=B`` (``text/event-stream``)::

    retry: 3000

    id: 1
    event: result
    data: {"seq":1,"session_id":"call-42","channel":1,"role":"customer","text":"...","emotion":{...},...}

    event: alert
    data: {"session_id":"call-42","rule":"angry_customer","seq":1,"seqs":[...],...}

    : keep-alive

    event: ended
    data: {"id":"call-42","state":"ended",...,"summary":{...}}

* ``id:`` is the result's ``seq``: ``EventSource`` resends the last one as ``Last-Event-ID`` when it
  reconnects, and the stream continues after it (``Last-Event-ID`` wins over ``after``). Results are
  replayed from the session store, so a resumed stream misses nothing even when the bus dropped it.
  Alerts carry no ``id`` (they follow their result); a resumed stream replays the alerts of the
  results it replays.
* A session that does not exist yet (or that the caller may not see: another tenant's session looks
  exactly like an unknown one) is waited for, with keep-alives, as long as the client stays.
* ``ended`` is sent when the session ends (and at connection time when it has ended already); the
  stream stays open, since a session can be continued. Close the ``EventSource`` on ``ended`` if
  that is all you wait for.
* ``: keep-alive`` comments every ``sse_keepalive_s`` (15 s) of silence; on each, the store is also
  re-read, so results stored while the bus was away still arrive.

``GET /v1/events?words=B`` (the session list): ``event: created | result | alert | ended | deleted``
with data ``{"session_id", "session": {...}}`` (created, ended), ``{"session_id", "result": {...}}``,
``{"session_id", "alert": {...}}``, ``{"session_id"}`` (deleted). ``id:`` is the bus event id;
``Last-Event-ID`` replays the retained events after it (``events_history``, 1000 by default), then
goes on live.

Both: a tenant's key sees only its tenant's sessions, admins (and everyone while auth is off) see all;
the key may be given as ``?api_key=`` because ``EventSource`` cannot send headers. A client more than
``sse_queue_size`` events behind, or not reading for ``sse_send_timeout_s``, is disconnected (and
resumes with ``Last-Event-ID``). ``sse_max_clients`` streams per process (503 beyond).

Thread-safety: each stream is one async generator on the request's event loop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Query, Request

from app.api.auth import Principal, principal_of
from app.api.sessions import SessionId, WordsQuery, _store, public_session, visible_session, without_words
from app.api.sse import KEEPALIVE, EventStreamResponse, ServerSentEvent
from app.schemas import ErrorBody
from app.store.common import ENDED
from app.store.events import Event, Subscription, SubscriptionDropped, id_key
from app.store.publishing import read_summary

log = logging.getLogger(__name__)

router = APIRouter(tags=["events"])

RETRY_MS = 3000  # EventSource's reconnection delay, sent first
PAGE = 500  # results replayed per store query

_SESSION_EXAMPLE = (
    "retry: 3000\n\n"
    'id: 1\nevent: result\ndata: {"seq":1,"session_id":"call-42","channel":1,"role":"customer",'
    '"start":0.8,"end":3.1,"text":"I have been waiting for an hour","emotion":{"label":"angry",...},'
    '"received_at":"2026-12-02T04:01:02.123Z"}\n\n'
    'event: alert\ndata: {"session_id":"call-42","rule":"angry_customer","seq":1,"seqs":[1],...}\n\n'
    ": keep-alive\n\n"
    'event: ended\ndata: {"id":"call-42","state":"ended",...,"summary":{...}}\n\n'
)
_LIST_EXAMPLE = (
    'id: 1764648000000-1\nevent: created\ndata: {"session_id":"call-42","session":{"id":"call-42",...}}\n\n'
    'id: 1764648000000-2\nevent: result\ndata: {"session_id":"call-42","result":{"seq":1,...}}\n\n'
    'id: 1764648000000-3\nevent: ended\ndata: {"session_id":"call-42","session":{...}}\n\n'
)


def _stream_doc(example: str, what: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": what,
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": example}},
        },
        503: {"model": ErrorBody, "description": "too many event streams (`too_many_event_streams`)"},
    }


def _bus(request: Request):
    _store(request)  # 503 store_unavailable first: no store, no events
    bus = getattr(request.app.state, "events", None)
    if bus is None:
        from app.errors import StoreUnavailableError

        raise StoreUnavailableError("events are not available on this server (no event bus)")
    return bus


def _resume_from(last_event_id: str | None, after: int | None) -> int:
    if last_event_id is not None and last_event_id.strip().isdigit():
        return int(last_event_id.strip())
    return after or 0


class _SessionStream:
    """The generator of one session's stream (see the module docstring for what it promises)."""

    def __init__(
        self,
        request: Request,
        session_id: str,
        principal: Principal,
        sub: Subscription,
        after: int,
        words: bool,
    ):
        settings = request.app.state.settings
        self.store = _store(request)
        self.session_id = session_id
        self.principal = principal
        self.sub = sub
        self.last = after  # highest result seq sent
        self.alert_floor = after  # alerts of results <= this were read from the store (sent)
        self.words = words
        self.keepalive_s = float(settings.sse_keepalive_s)
        self.ended_sent = False

    def _result(self, result: dict) -> ServerSentEvent:
        return ServerSentEvent(event="result", id=int(result["seq"]), data=without_words(result, self.words))

    async def _catch_up(self) -> AsyncIterator[ServerSentEvent]:
        """Every stored result after ``last``, each followed by its alerts, from the store."""
        read_alerts = getattr(self.store, "alerts", None)
        while True:
            page = await self.store.results(self.session_id, after=self.last, limit=PAGE)
            if not page:
                return
            alerts = await read_alerts(self.session_id, after=self.last) if read_alerts else []
            by_seq: dict[int, list[dict]] = {}
            for alert in alerts:
                by_seq.setdefault(int(alert["seq"]), []).append(alert)
            for result in page:
                yield self._result(result)
                for alert in by_seq.get(int(result["seq"]), []):
                    yield ServerSentEvent(event="alert", data=alert)
                self.last = self.alert_floor = int(result["seq"])
            if len(page) < PAGE:
                return

    async def _ended(self, view: dict | None = None) -> ServerSentEvent | None:
        if view is None or "summary" not in view or view.get("summary") is None:
            view = await visible_session(self.store, self.session_id, self.principal)
            if view is None or view.get("state") != ENDED:
                return None
            view = {
                **view,
                "summary": (await read_summary(self.store, self.session_id, view.get("roles"))).model_dump(),
            }
        self.ended_sent = True
        return ServerSentEvent(event="ended", data=public_session(view, self.words))

    async def _check_store(self) -> AsyncIterator[ServerSentEvent]:
        """Keep-alive time: results or an end the bus did not bring (Redis away, another process)."""
        view = await visible_session(self.store, self.session_id, self.principal)
        if view is None:
            return
        if int(view.get("last_seq", 0)) > self.last:
            async for message in self._catch_up():
                yield message
        if view.get("state") == ENDED and not self.ended_sent:
            ended = await self._ended()
            if ended is not None:
                yield ended
        elif view.get("state") != ENDED:
            self.ended_sent = False

    async def __call__(self) -> AsyncIterator[ServerSentEvent | bytes]:
        try:
            yield ServerSentEvent(retry_ms=RETRY_MS)
            # 1. the session may not exist yet (or not be ours): wait, with keep-alives
            while await visible_session(self.store, self.session_id, self.principal) is None:
                event = await self.sub.get(self.keepalive_s)
                if event is None:
                    yield KEEPALIVE
            # 2. what is stored already (the subscription queues what happens meanwhile)
            async for message in self._catch_up():
                yield message
            view = await visible_session(self.store, self.session_id, self.principal)
            if view is not None and view.get("state") == ENDED:
                ended = await self._ended()
                if ended is not None:
                    yield ended
            # 3. live
            while True:
                event = await self.sub.get(self.keepalive_s)
                if event is None:
                    yield KEEPALIVE
                    async for message in self._check_store():
                        yield message
                    continue
                async for message in self._live(event):
                    yield message
        except SubscriptionDropped:
            log.info(
                "event stream of session %s: the client fell behind; closing (it resumes)", self.session_id
            )
        finally:
            self.sub.close()

    async def _live(self, event: Event) -> AsyncIterator[ServerSentEvent]:
        if not self.principal.can_see(event.tenant):  # deleted and created again by another tenant
            return
        if event.type in ("result", "alert"):
            seq = int(event.data.get("seq", 0))
            if seq > self.last + (1 if event.type == "result" else 0):
                async for message in self._catch_up():  # a gap (events out of order): the store has it all
                    yield message
            elif event.type == "result" and seq == self.last + 1:
                yield self._result(event.data)
                self.last = seq
            elif event.type == "alert" and seq > self.alert_floor:
                yield ServerSentEvent(event="alert", data=event.data)
        elif event.type == "ended":
            async for message in self._catch_up():  # every result before the end
                yield message
            ended = await self._ended(event.data)
            if ended is not None:
                yield ended
        elif event.type == "created":
            self.ended_sent = False
        elif event.type == "deleted":  # a session made again under this id numbers from 1
            self.last = self.alert_floor = 0
            self.ended_sent = False


@router.get(
    "/v1/sessions/{session_id}/events",
    response_class=EventStreamResponse,
    responses=_stream_doc(_SESSION_EXAMPLE, "Server-sent events of one session: result, alert, ended"),
    summary="Server-sent events of one session (waits for a session that does not exist yet)",
)
async def session_events(
    request: Request,
    session_id: str = SessionId,
    after: int | None = Query(None, ge=0, le=2**63 - 1, description="start after this result seq"),
    words: bool = WordsQuery,
    last_event_id: str | None = Header(None, alias="Last-Event-ID", description="set by EventSource"),
) -> EventStreamResponse:
    bus = _bus(request)
    principal = principal_of(request)
    settings = request.app.state.settings
    sub = await bus.subscribe(session_id, queue_size=settings.sse_queue_size)  # before any read
    stream = _SessionStream(request, session_id, principal, sub, _resume_from(last_event_id, after), words)
    return EventStreamResponse(stream(), send_timeout_s=settings.sse_send_timeout_s, on_close=sub.close)


def _list_message(event: Event, words: bool) -> ServerSentEvent:
    data: dict[str, Any] = {"session_id": event.session_id}
    if event.type in ("created", "ended"):
        data["session"] = public_session(event.data, words)
    elif event.type == "result":
        data["result"] = without_words(event.data, words)
    elif event.type == "alert":
        data["alert"] = event.data
    return ServerSentEvent(event=event.type, id=event.id, data=data)


async def _list_stream(
    bus, sub: Subscription, principal: Principal, last_event_id: str | None, words: bool, keepalive_s: float
) -> AsyncIterator[ServerSentEvent | bytes]:
    try:
        yield ServerSentEvent(retry_ms=RETRY_MS)
        floor = (-1, -1)
        if last_event_id:
            for event in await bus.history(last_event_id.strip(), limit=bus.history_size):
                floor = max(floor, id_key(event.id))
                if principal.can_see(event.tenant):
                    yield _list_message(event, words)
        while True:
            event = await sub.get(keepalive_s)
            if event is None:
                yield KEEPALIVE
            elif id_key(event.id) > floor and principal.can_see(event.tenant):
                yield _list_message(event, words)
    except SubscriptionDropped:
        log.info("session-list event stream: the client fell behind; closing (it resumes)")
    finally:
        sub.close()


@router.get(
    "/v1/events",
    response_class=EventStreamResponse,
    responses=_stream_doc(_LIST_EXAMPLE, "Server-sent events of every session the caller may see"),
    summary="Server-sent events of the session list: created, result, alert, ended, deleted",
)
async def list_events(
    request: Request,
    words: bool = WordsQuery,
    last_event_id: str | None = Header(None, alias="Last-Event-ID", description="set by EventSource"),
) -> EventStreamResponse:
    bus = _bus(request)
    settings = request.app.state.settings
    sub = await bus.subscribe(None, queue_size=settings.sse_queue_size)
    stream = _list_stream(
        bus, sub, principal_of(request), last_event_id, words, float(settings.sse_keepalive_s)
    )
    return EventStreamResponse(stream, send_timeout_s=settings.sse_send_timeout_s, on_close=sub.close)
