"""Pieces shared by the store backends: errors, the public session view, long-poll wake-ups.

A backend keeps, per session, a handful of raw fields (see ``RawSession``) and turns them into the
public dict with ``session_view`` so that both backends answer byte-for-byte the same shape:

``id, state, source, created_at, updated_at, ended_at, duration_s, audio_duration_s, metadata,
channels, result_count, last_seq, emotion {n, label, counts, mean_probabilities}, last_result,
tenant, end_reason, created_at_ts, updated_at_ts, ended_at_ts, roles, alert_count, summary``.

Lifecycle: a stream session ends when its stream does; a REST session (``/v1/predict?session_id=``)
is ended by ``sweep`` after ``rest_idle_s`` without a new result (reason ``idle``); a stream
session whose server process died (no heartbeat for ``stream_stale_s``, or, for SQLite, every
stream session still active when a server starts) is ended with reason ``server_restart``. Ended
sessions are forgotten ``ended_ttl_s`` after their end. Metadata is merged shallowly on re-open
and capped (``MAX_METADATA_BYTES`` by default): a merge beyond it raises ``MetadataTooLarge``.

Times: ``created_at``, ``updated_at``, ``ended_at`` are ISO-8601 UTC strings with milliseconds
(``2026-12-02T04:01:02.123Z``); the Unix seconds (float) they come from stay under ``*_ts`` for older
clients. ``duration_s`` is wall time from creation to the end (or to now while active);
``audio_duration_s`` is the largest result ``end`` seen (audio time). ``summary`` is None here: the
API fills it in where it reads the results (``app.store.summary``).

Roles: a session may carry ``roles`` (index = channel, e.g. ``["agent", "customer"]``); an appended
result without a ``role`` gets ``roles[channel]`` (None beyond the list), and every stored result
gets ``received_at`` (ISO-8601 UTC): ``stored_body``. Alerts (``app.store.alerts``) fired by a result
are stored with the session in the same transaction as the result: ``Appended`` is what an append
produced.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

ACTIVE = "active"
ENDED = "ended"
STATES = (ACTIVE, ENDED)
SOURCES = ("stream", "rest")


def iso(ts: float | None) -> str | None:
    """Unix seconds -> ISO-8601 UTC with milliseconds and a ``Z`` (None stays None)."""
    if ts is None:
        return None
    text = datetime.fromtimestamp(float(ts), tz=timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


class SessionNotFound(KeyError):
    """The session does not exist (never created, deleted, or expired)."""


MAX_METADATA_BYTES = 16 * 1024  # stored (merged) session metadata, as compact JSON
END_IDLE = "idle"  # a REST session without new results for ``rest_idle_s``
END_RESTART = "server_restart"  # a stream whose server process went away (crash, kill -9, restart)


class MetadataTooLarge(ValueError):
    """The session's metadata (after merging the new keys) would exceed the cap: nothing was written."""

    status = 413
    code = "metadata_too_large"


def merged_metadata(old: Mapping[str, Any], new: Mapping[str, Any] | None, cap: int) -> str:
    """JSON of ``old`` with ``new``'s keys replacing/adding (shallow); raises ``MetadataTooLarge``."""
    merged = {**old, **(new or {})}
    text = json.dumps(merged, separators=(",", ":"))
    if cap > 0 and len(text.encode()) > cap:
        raise MetadataTooLarge(
            f"session metadata would be {len(text.encode())} bytes of JSON; at most {cap} "
            "(keys sent again replace the stored ones)"
        )
    return text


class StoreBusy(Exception):
    """Every connection reserved for long polls is in use: retry later (HTTP 503 + Retry-After).

    Follows the ``status``/``code`` convention of ``app.errors`` so the API maps it by itself.
    """

    status = 503
    code = "store_busy"
    retry_after: float | None = 1.0


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    return source


def check_state(state: str | None) -> str | None:
    if state is not None and state not in STATES:
        raise ValueError(f"state must be one of {STATES}, not {state!r}")
    return state


@dataclass(frozen=True)
class ResultStats:
    """What a result contributes to its session's running aggregates."""

    channel: int
    end: float
    label: str | None
    probabilities: dict[str, float]

    @classmethod
    def of(cls, result: Mapping[str, Any]) -> ResultStats:
        emotion = result.get("emotion") or {}
        if hasattr(emotion, "model_dump"):  # tolerate a pydantic Emotion, not only its dict
            emotion = emotion.model_dump()
        probs = {str(k): float(v) for k, v in (emotion.get("probabilities") or {}).items()}
        label = emotion.get("label") or None
        return cls(
            channel=int(result.get("channel", 0) or 0),
            end=float(result.get("end", 0.0) or 0.0),
            label=str(label) if label else None,
            probabilities=probs,
        )


@dataclass
class RawSession:
    """The stored fields of a session, backend-neutral."""

    id: str
    state: str
    source: str
    created_at: float
    updated_at: float
    ended_at: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    channels: list[int] = field(default_factory=list)
    result_count: int = 0
    last_seq: int = 0
    audio_end: float = 0.0
    emo_n: int = 0
    emo_counts: dict[str, int] = field(default_factory=dict)
    emo_psum: dict[str, float] = field(default_factory=dict)
    last_result: dict[str, Any] | None = None
    tenant: str | None = None  # owner (API-key tenant); None = admin / no auth / before tenants
    end_reason: str | None = None  # why it ended when the server ended it (idle, server_restart)
    heartbeat_at: float | None = None  # last sign of life of its live stream
    roles: list[str] | None = None  # index = channel (``start.roles`` / ``?roles=``)
    alert_count: int = 0  # alerts stored with the session


def session_view(raw: RawSession, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    end = raw.ended_at if raw.ended_at is not None else now
    mean = {k: v / raw.emo_n for k, v in sorted(raw.emo_psum.items())} if raw.emo_n else {}
    return {
        "id": raw.id,
        "state": raw.state,
        "source": raw.source,
        "created_at": iso(raw.created_at),
        "updated_at": iso(raw.updated_at),
        "ended_at": iso(raw.ended_at),
        "duration_s": round(max(0.0, end - raw.created_at), 3),
        "audio_duration_s": round(raw.audio_end, 3),
        "metadata": raw.metadata,
        "channels": sorted(set(raw.channels)),
        "result_count": raw.result_count,
        "last_seq": raw.last_seq,
        "emotion": {
            "n": raw.emo_n,
            "label": max(mean, key=mean.__getitem__) if mean else None,
            "counts": dict(sorted(raw.emo_counts.items())),
            "mean_probabilities": mean,
        },
        "last_result": raw.last_result,
        "tenant": raw.tenant,
        "end_reason": raw.end_reason,
        "created_at_ts": raw.created_at,
        "updated_at_ts": raw.updated_at,
        "ended_at_ts": raw.ended_at,
        "roles": raw.roles,
        "alert_count": raw.alert_count,
        "summary": None,
    }


def stamp(result: Mapping[str, Any], session_id: str, seq: int) -> dict[str, Any]:
    """The stored form of a result: the caller's fields plus its session id and sequence number."""
    out = {k: v for k, v in result.items() if k not in ("seq", "session_id")}
    return {"seq": seq, "session_id": session_id, **out}


def role_of(roles: Sequence[str] | None, channel: int) -> str | None:
    return roles[channel] if roles and 0 <= channel < len(roles) else None


def stored_body(result: Mapping[str, Any], roles: Sequence[str] | None, now: float) -> dict[str, Any]:
    """What a backend stores for an appended result (without ``seq``/``session_id``): the caller's
    fields, ``role`` from the session's roles when the result names none, and ``received_at``."""
    body = {k: v for k, v in result.items() if k not in ("seq", "session_id")}
    if not body.get("role"):
        body["role"] = role_of(roles, int(body.get("channel", 0) or 0))
    body["received_at"] = iso(now)
    return body


def dump_roles(roles: Sequence[str] | None) -> str | None:
    return json.dumps(list(roles)) if roles is not None else None


def load_roles(text: str | None) -> list[str] | None:
    return [str(r) for r in json.loads(text)] if text else None


@dataclass(frozen=True)
class Appended:
    """What ``append`` stored: the result's number, its stored form, the alerts it fired and the
    session's owner (so that events can be scoped to the tenant without another read)."""

    seq: int
    result: dict[str, Any]
    alerts: list[dict[str, Any]] = field(default_factory=list)
    tenant: str | None = None


class Waiters:
    """Per-session wake-ups for long polls, usable from any thread and any event loop.

    Each waiting coroutine registers its own ``asyncio.Event`` together with its loop; ``notify``
    sets them with ``call_soon_threadsafe``. An Event per waiter (rather than one Condition per
    session) is what makes this safe when the store is shared by several loops, as under a test
    client, and when ``notify`` is called from the SQLite writer thread.

    Thread-safety: all methods may be called from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_session: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def register(self, session_id: str) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        token = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._by_session.setdefault(session_id, set()).add(token)
        return token

    def unregister(self, session_id: str, token) -> None:
        with self._lock:
            bucket = self._by_session.get(session_id)
            if bucket is not None:
                bucket.discard(token)
                if not bucket:
                    del self._by_session[session_id]

    def notify(self, session_id: str) -> None:
        with self._lock:
            tokens = list(self._by_session.get(session_id, ()))
        for loop, event in tokens:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its waiter is gone
                pass
