"""Session routes for dashboards (polling): list, inspect, long-poll results, delete.

* ``GET /v1/sessions?state=active|ended&limit=N``: newest first (by last update).
* ``GET /v1/sessions/{id}``: state, durations, emotion distribution so far (counts per label and
  mean probabilities over the session's results), last result.
* ``GET /v1/sessions/{id}/results?after=SEQ&wait=S&limit=N``: results with ``seq > after``. With
  ``wait`` > 0 the request is held until a newer result exists (answered as soon as one is
  stored, by this replica or another one sharing the store), the session ends or is deleted,
  or ``wait`` passes (then ``results`` is empty). ``wait`` is capped at
  ``settings.sessions_max_wait_s`` (60 s). Poll again with ``after = last_seq``.
* ``DELETE /v1/sessions/{id}``: 204; the session and its results are gone.

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

from typing import Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api.auth import Principal, principal_of
from app.errors import ServiceError, StoreUnavailableError
from app.schemas import Emotion, ErrorBody, WordOut
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
    start: float
    end: float
    text: str = ""
    words: list[WordOut] = Field(default_factory=list)
    emotion: Emotion | None = None
    source: str | None = Field(None, description="stream | rest")


class EmotionSoFar(BaseModel):
    n: int = Field(description="results with an emotion")
    label: str | None = Field(description="argmax of mean_probabilities")
    counts: dict[str, int] = Field(description="results per predicted label")
    mean_probabilities: dict[str, float]


class SessionOut(BaseModel):
    id: str
    state: Literal["active", "ended"]
    source: Literal["stream", "rest"]
    created_at: float = Field(description="Unix time")
    updated_at: float
    ended_at: float | None
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


class SessionList(BaseModel):
    sessions: list[SessionOut]


class ResultsOut(BaseModel):
    session_id: str
    state: Literal["active", "ended"]
    last_seq: int = Field(description="poll again with after=last_seq")
    results: list[StoredResult]


_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "unknown session id"}}
SessionId = Path(pattern=SESSION_ID_PATTERN, description="session id")


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
    return SessionList(sessions=sessions)


@router.get("/{session_id}", response_model=SessionOut, responses=_NOT_FOUND, summary="One session")
async def get_session(request: Request, session_id: str = SessionId) -> SessionOut:
    return SessionOut(**await _session(_store(request), session_id, principal_of(request)))


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
    wait: float = Query(0.0, ge=0.0, description="seconds to wait for a newer result (capped)"),
    limit: int = Query(100, ge=1, le=1000),
) -> ResultsOut:
    store = _store(request)
    await _session(store, session_id, principal_of(request))
    wait_s = min(wait, float(request.app.state.settings.sessions_max_wait_s))
    results = await store.results(session_id, after=after, wait_s=wait_s, limit=limit)
    view = await store.get_session(session_id)
    if view is None:  # deleted while we waited
        raise SessionNotFoundError(f"session {session_id!r} was deleted")
    last = results[-1]["seq"] if results else after
    return ResultsOut(session_id=session_id, state=view["state"], last_seq=last, results=results)


@router.delete("/{session_id}", status_code=204, responses=_NOT_FOUND, summary="Delete a session")
async def delete_session(request: Request, session_id: str = SessionId) -> Response:
    store = _store(request)
    await _session(store, session_id, principal_of(request))
    if not await store.delete_session(session_id):
        raise SessionNotFoundError(f"no session {session_id!r}")
    return Response(status_code=204)
