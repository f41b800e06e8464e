"""``PublishingStore``: a session store that announces its changes on an event bus.

It wraps any ``SessionStore`` (``create_app`` wraps the one it opens, or the one it is given) and
publishes, after the backend call succeeded:

* ``created``: ``open_session`` made the session active (new, or re-opened after its end); data =
  session JSON.
* ``result``: ``append_result`` / ``append`` stored a result; data = the stored result (``seq``,
  ``role``, ``received_at``, ...). Then one ``alert`` per alert the result fired (data = the alert).
* ``ended``: ``close_session``, ``sweep`` (idle REST sessions, streams of dead replicas) or
  ``recover`` ended it; data = session JSON with ``summary`` (``app.store.summary``) filled in.
* ``deleted``: ``delete_session`` removed it; data = ``{"id"}``.

A publish that fails (Redis away) is logged and does not fail the store call: results are durable,
and per-session event streams replay them from the store when the client reconnects.

Every other attribute is the backend's (``__getattr__``), so the wrapper is transparent for readers.
Stores without ``append`` / ``sweep_ended`` / ``recover_ended`` (test doubles) still work, with
less detail in their events.

Thread-safety: as the wrapped store (one event loop); it keeps no state of its own.
"""

from __future__ import annotations

import logging
from typing import Any

from app.store.common import ACTIVE, ENDED, Appended, stamp
from app.store.events import Event, EventBus
from app.store.summary import CallSummary, summarize

log = logging.getLogger(__name__)

SUMMARY_PAGE = 1000  # results read per query when summarising a session


async def read_summary(store, session_id: str, roles: list[str] | None = None) -> CallSummary:
    """The call summary of every stored result of ``session_id`` (read page by page)."""
    results: list[dict] = []
    after = 0
    while True:
        page = await store.results(session_id, after=after, limit=SUMMARY_PAGE)
        results += page
        if len(page) < SUMMARY_PAGE:
            break
        after = int(page[-1]["seq"])
    return summarize(results, roles, session_id)


class PublishingStore:
    """See the module docstring. ``backend``: the wrapped store; ``bus``: where events go."""

    def __init__(self, store, bus: EventBus):
        self.backend = store
        self.bus = bus

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    async def _publish(self, kind: str, session_id: str, tenant: str | None, data: dict[str, Any]) -> None:
        try:
            await self.bus.publish(Event(type=kind, session_id=session_id, tenant=tenant, data=data))
        except Exception as exc:
            log.warning("could not publish the %s event of session %s: %s", kind, session_id, exc)

    async def open_session(self, session_id: str, metadata=None, source: str = "stream", **kwargs) -> dict:
        get = getattr(self.backend, "get_session", None)
        before = await get(session_id) if get is not None else None
        view = await self.backend.open_session(session_id, metadata, source=source, **kwargs)
        if before is None or before.get("state") != ACTIVE:
            await self._publish("created", session_id, view.get("tenant"), view)
        return view

    async def append(self, session_id: str, result: dict[str, Any]) -> Appended:
        append = getattr(self.backend, "append", None)
        if append is not None:
            out: Appended = await append(session_id, result)
        else:
            seq = await self.backend.append_result(session_id, result)
            out = Appended(seq=seq, result=stamp(result, session_id, seq))
        await self._publish("result", session_id, out.tenant, out.result)
        for alert in out.alerts:
            await self._publish("alert", session_id, out.tenant, alert)
        return out

    async def append_result(self, session_id: str, result: dict[str, Any]) -> int:
        return (await self.append(session_id, result)).seq

    async def close_session(self, session_id: str, reason: str | None = None):
        if reason is None:
            ended = await self.backend.close_session(session_id)
        else:
            ended = await self.backend.close_session(session_id, reason)
        if ended is not False:  # True, or None from a store that does not say
            await self.announce_end(session_id)
        return ended

    async def announce_end(self, session_id: str) -> None:
        """Publish ``ended`` (session JSON with its summary) if the session is ended now."""
        try:
            view = await self.backend.get_session(session_id)
            if view is None or view.get("state") != ENDED:
                return
            view["summary"] = (await read_summary(self.backend, session_id, view.get("roles"))).model_dump()
        except Exception as exc:
            log.warning("could not read session %s to announce its end: %s", session_id, exc)
            return
        await self._publish("ended", session_id, view.get("tenant"), view)

    async def sweep(self, rest_idle_s: float = 900.0, stream_stale_s: float = 90.0) -> int:
        sweep_ended = getattr(self.backend, "sweep_ended", None)
        if sweep_ended is None:
            sweep = getattr(self.backend, "sweep", None)
            return await sweep(rest_idle_s=rest_idle_s, stream_stale_s=stream_stale_s) if sweep else 0
        ended = await sweep_ended(rest_idle_s=rest_idle_s, stream_stale_s=stream_stale_s)
        for sid in ended:
            await self.announce_end(sid)
        return len(ended)

    async def recover(self, stream_stale_s: float = 90.0) -> int:
        recover_ended = getattr(self.backend, "recover_ended", None)
        if recover_ended is None:
            recover = getattr(self.backend, "recover", None)
            return await recover(stream_stale_s=stream_stale_s) if recover else 0
        ended = await recover_ended(stream_stale_s=stream_stale_s)
        for sid in ended:
            await self.announce_end(sid)
        return len(ended)

    async def delete_session(self, session_id: str) -> bool:
        get = getattr(self.backend, "get_session", None)
        before = await get(session_id) if get is not None else None
        existed = await self.backend.delete_session(session_id)
        if existed:
            await self._publish("deleted", session_id, (before or {}).get("tenant"), {"id": session_id})
        return existed


def with_events(store, bus: EventBus) -> PublishingStore | None:
    """``store`` wrapped so that it publishes on ``bus`` (None stays None; never wrapped twice)."""
    if store is None:
        return None
    if isinstance(store, PublishingStore):
        return store
    return PublishingStore(store, bus)


__all__ = ["PublishingStore", "read_summary", "with_events"]
