"""Session routes for dashboards (polling): list, inspect, long-poll results, delete.

* ``GET /v1/sessions?state=active|ended&limit=N``: newest first (by last update).
* ``GET /v1/sessions/{id}``: state, durations, emotion distribution so far (counts per label and
  mean probabilities over the session's results), last result.
* ``GET /v1/sessions/{id}/results?after=SEQ&wait=S&limit=N&words=B``: results with ``seq > after``.
  With ``wait`` > 0 the request is held until a newer result exists (answered as soon as one is
  stored, by this replica or another one sharing the store), the session ends or is deleted,
  or ``wait`` passes (then ``results`` is empty). ``wait`` is capped at
  ``settings.sessions_max_wait_s`` (60 s). Poll again with ``after = last_seq``. A session that
  does not exist yet is waited for too (within the same ``wait``; 404 when it has not appeared).
* ``GET /v1/sessions/{id}/summary``: the call summary (``app.store.summary``): per role (or
  channel) mean probabilities, trend, share of negative utterances, text sentiment, disagreements.
* ``GET /v1/sessions/{id}/alerts?after=SEQ``: the alerts the configured rules fired
  (``app.store.alerts``), oldest first.
* ``DELETE /v1/sessions/{id}``: 204; the session and its results are gone.

Times in session JSON are ISO-8601 UTC (``created_at``, ...; Unix seconds under ``*_ts``). Stored
results keep their word timings; they are returned only with ``words=true``. Server-sent events of
the same data are in ``app.api.events``.

Unknown ids: 404 ``{"error": "session_not_found", "detail": ...}``; no session store: 503
``store_unavailable``; every long-poll connection of the store in use: 503 ``store_busy`` with
Retry-After. The API key applies as on every /v1 route (``app.main`` adds it).

Tenants (``app.api.auth``): a key sees only its tenant's sessions; another tenant's session is 404
``session_not_found``, exactly like an unknown id, so its existence is not revealed. Admin keys
(and everyone while auth is off) see every session. The same rule applies to continuing a
session through ``/v1/predict?session_id=`` and the WebSocket ``start`` (``may_use_session``).
Thread-safety: stateless handlers over the shared store.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from app.api.auth import Principal, principal_of
from app.errors import ServiceError, StoreUnavailableError
from app.schemas import Emotion, ErrorBody, WordOut
from app.store.alerts import Alert
from app.store.events import SubscriptionDropped
from app.store.publishing import read_summary
from app.store.summary import CallSummary
from app.streaming.protocol import SESSION_ID_PATTERN

router = APIRouter(
    prefix="/v1/sessions",
    tags=["sessions"],
    responses={
        503: {
            "model": ErrorBody,
            "description": "no session store (`store_unavailable`), or too many long polls (`store_busy`, "
            "with Retry-After)",
        }
    },
)


class SessionNotFoundError(ServiceError):
    status = 404
    code = "session_not_found"


class StoredResult(BaseModel):
    """One stored result: a streaming ``final`` or a REST segment (extra fields are kept)."""

    model_config = ConfigDict(extra="allow")

    seq: int
    session_id: str
    channel: int = 0
    role: str | None = Field(None, description="from the session's roles (index = channel)")
    start: float
    end: float
    text: str = ""
    emotion: Emotion | None = None
    text_sentiment: dict[str, Any] | None = Field(
        None, description="VADER sentiment of the text (label, compound, pos, neu, neg); null without text"
    )
    words: list[WordOut] | None = Field(
        None, description="word timings and confidences; only with `words=true`"
    )
    source: str | None = Field(None, description="stream | rest")
    received_at: str | None = Field(None, description="ISO-8601 UTC time the result was stored")

    @model_serializer(mode="wrap")
    def _omit_absent_words(self, handler):
        data = handler(self)
        if isinstance(data, dict) and data.get("words") is None:
            data.pop("words", None)
        return data


class EmotionSoFar(BaseModel):
    n: int = Field(description="results with an emotion")
    label: str | None = Field(description="argmax of mean_probabilities")
    counts: dict[str, int] = Field(description="results per predicted label")
    mean_probabilities: dict[str, float]


class SessionOut(BaseModel):
    id: str
    state: Literal["active", "ended"]
    source: Literal["stream", "rest"]
    created_at: str = Field(description="ISO-8601 UTC, e.g. 2026-12-02T04:01:02.123Z")
    updated_at: str
    ended_at: str | None
    duration_s: float = Field(description="wall time from creation to end (or now)")
    audio_duration_s: float = Field(description="largest result end time (audio seconds)")
    metadata: dict[str, Any]
    channels: list[int]
    result_count: int
    last_seq: int
    emotion: EmotionSoFar
    last_result: StoredResult | None
    tenant: str | None = Field(
        None, description="owner: API-key tenant (null: admin, or created with auth off)"
    )
    end_reason: str | None = Field(
        None, description="set when the server ended it: idle (REST session) | server_restart (stream)"
    )
    created_at_ts: float | None = Field(None, description="created_at as Unix seconds (compatibility)")
    updated_at_ts: float | None = None
    ended_at_ts: float | None = None
    roles: list[str] | None = Field(None, description="role per channel (index = channel)")
    alert_count: int = Field(0, description="alerts fired in this session (GET .../alerts)")
    summary: CallSummary | None = Field(
        None, description="call summary: on GET /v1/sessions/{id} and in `ended` events; null in listings"
    )


class SessionList(BaseModel):
    sessions: list[SessionOut]


class ResultsOut(BaseModel):
    session_id: str
    state: Literal["active", "ended"]
    last_seq: int = Field(description="poll again with after=last_seq")
    results: list[StoredResult]


class AlertsOut(BaseModel):
    session_id: str
    alerts: list[Alert]


_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "unknown session id"}}
SessionId = Path(pattern=SESSION_ID_PATTERN, description="session id")
WordsQuery = Query(False, description="include each result's word timings and confidences")
RECHECK_S = (
    1.0  # a wait for a session re-reads the store at least this often (missed events, other processes)
)


def without_words(result: dict | None, words: bool = False) -> dict | None:
    """The result as readers get it: the stored word list only when asked for (``words=true``)."""
    if result is None or words or "words" not in result:
        return result
    return {k: v for k, v in result.items() if k != "words"}


def public_session(view: dict, words: bool = False) -> dict:
    return {**view, "last_result": without_words(view.get("last_result"), words)}


def _store(request: Request):
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise StoreUnavailableError("sessions are not available on this server (no session store)")
    return store


def owner_kwargs(principal: Principal) -> dict[str, Any]:
    """``open_session`` keyword for the caller's tenant (none for admins / auth off, so stores and
    test doubles without the parameter keep working)."""
    return {} if principal.tenant is None else {"tenant": principal.tenant}


async def may_use_session(store, session_id: str, principal: Principal) -> dict | None:
    """The session when it exists and the caller may see it; None when it does not exist;
    ``SessionNotFoundError`` when it belongs to another tenant (indistinguishable from unknown)."""
    get = getattr(store, "get_session", None)
    if get is None:
        return None
    view = await get(session_id)
    if view is not None and not principal.can_see(view.get("tenant")):
        raise SessionNotFoundError(f"no session {session_id!r}")
    return view


async def visible_session(store, session_id: str, principal: Principal) -> dict | None:
    """The session when it exists and the caller may see it; None otherwise (unknown and another
    tenant's alike, so that waiting reveals nothing)."""
    get = getattr(store, "get_session", None)
    if get is None:
        return None
    view = await get(session_id)
    return view if view is not None and principal.can_see(view.get("tenant")) else None


async def wait_for_session(
    request: Request, session_id: str, principal: Principal, timeout_s: float
) -> dict | None:
    """Wait up to ``timeout_s`` for the session to exist (and be visible to the caller): woken by its
    events on the bus, and re-reading the store every ``RECHECK_S``. None when it did not appear."""
    store = _store(request)
    bus = getattr(request.app.state, "events", None)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, timeout_s)
    sub = await bus.subscribe(session_id, queue_size=8) if bus is not None else None
    try:
        while True:
            view = await visible_session(store, session_id, principal)
            remaining = deadline - loop.time()
            if view is not None or remaining <= 0:
                return view
            step = min(remaining, RECHECK_S)
            if sub is None:
                await asyncio.sleep(step)
                continue
            try:
                await sub.get(step)
            except SubscriptionDropped:  # busy foreign session: keep polling the store instead
                sub = None
    finally:
        if sub is not None:
            sub.close()


async def _session(store, session_id: str, principal: Principal) -> dict:
    view = await may_use_session(store, session_id, principal)
    if view is None:
        raise SessionNotFoundError(f"no session {session_id!r}")
    return view


@router.get("", response_model=SessionList, summary="Active and recent sessions")
async def list_sessions(
    request: Request,
    state: Literal["active", "ended"] | None = Query(None, description="only sessions in this state"),
    limit: int = Query(50, ge=1, le=1000),
) -> SessionList:
    scope = principal_of(request).scope
    tenant = {} if scope is None else {"tenant": scope}
    sessions = await _store(request).list_sessions(state=state, limit=limit, **tenant)
    return SessionList(sessions=[public_session(s) for s in sessions])


@router.get("/{session_id}", response_model=SessionOut, responses=_NOT_FOUND, summary="One session")
async def get_session(request: Request, session_id: str = SessionId, words: bool = WordsQuery) -> SessionOut:
    store = _store(request)
    view = await _session(store, session_id, principal_of(request))
    if hasattr(store, "results"):
        view = {**view, "summary": await read_summary(store, session_id, view.get("roles"))}
    return SessionOut(**public_session(view, words))


@router.get(
    "/{session_id}/summary",
    response_model=CallSummary,
    responses=_NOT_FOUND,
    summary="Call summary: per role (or channel) emotions, trend, negative share, text sentiment",
)
async def session_summary(request: Request, session_id: str = SessionId) -> CallSummary:
    store = _store(request)
    view = await _session(store, session_id, principal_of(request))
    return await read_summary(store, session_id, view.get("roles"))


@router.get("/{session_id}/alerts", response_model=AlertsOut, responses=_NOT_FOUND, summary="Alerts fired")
async def session_alerts(
    request: Request,
    session_id: str = SessionId,
    after: int = Query(0, ge=0, le=2**63 - 1, description="alerts of results with seq > after"),
    limit: int = Query(1000, ge=1, le=10000),
) -> AlertsOut:
    store = _store(request)
    await _session(store, session_id, principal_of(request))
    read = getattr(store, "alerts", None)
    alerts = await read(session_id, after=after, limit=limit) if read is not None else []
    return AlertsOut(session_id=session_id, alerts=alerts)


@router.get(
    "/{session_id}/results",
    response_model=ResultsOut,
    responses=_NOT_FOUND,
    summary="Results after a sequence number (long poll)",
)
async def session_results(
    request: Request,
    session_id: str = SessionId,
    after: int = Query(0, ge=0, le=2**63 - 1, description="return results with seq > after"),
    wait: float = Query(
        0.0, ge=0.0, description="seconds to wait for a newer result, or for the session to appear (capped)"
    ),
    limit: int = Query(100, ge=1, le=1000),
    words: bool = WordsQuery,
) -> ResultsOut:
    store = _store(request)
    principal = principal_of(request)
    wait_s = min(wait, float(request.app.state.settings.sessions_max_wait_s))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    try:
        await _session(store, session_id, principal)
    except SessionNotFoundError:
        if wait_s <= 0 or await wait_for_session(request, session_id, principal, wait_s) is None:
            raise
        wait_s = max(0.0, deadline - loop.time())
    results = await store.results(session_id, after=after, wait_s=wait_s, limit=limit)
    view = await store.get_session(session_id)
    if view is None:  # deleted while we waited
        raise SessionNotFoundError(f"session {session_id!r} was deleted")
    last = results[-1]["seq"] if results else after
    shown = [without_words(r, words) for r in results]
    return ResultsOut(session_id=session_id, state=view["state"], last_seq=last, results=shown)


@router.delete("/{session_id}", status_code=204, responses=_NOT_FOUND, summary="Delete a session")
async def delete_session(request: Request, session_id: str = SessionId) -> Response:
    store = _store(request)
    await _session(store, session_id, principal_of(request))
    if not await store.delete_session(session_id):
        raise SessionNotFoundError(f"no session {session_id!r}")
    return Response(status_code=204)
