"""The session store interface: durable, ordered results per session.

Two backends implement it: SQLite (embedded default, survives restarts) and Redis (shared by
several replicas). A *result* is a JSON-serialisable dict shaped like a streaming ``final`` message
(``channel``, ``start``, ``end``, ``text``, ``words``, ``emotion``, ...). ``append_result`` assigns
the next sequence number of the session (1, 2, 3, ...) atomically and returns it; ``append`` does
the same and also returns the stored form (with ``role`` and ``received_at``) and the alerts the
configured rules fired (``app.store.alerts``), which are stored with the session.

``sweep_ended`` / ``recover_ended`` are ``sweep`` / ``recover`` returning the ids they ended, so that
``app.store.events.PublishingStore`` can announce them.
"""

from __future__ import annotations

from typing import Any, Protocol

from app.store.common import Appended


class SessionStore(Protocol):
    async def open_session(
        self,
        session_id: str,
        metadata: dict[str, Any] | None = None,
        source: str = "stream",
        tenant: str | None = None,
        roles: list[str] | None = None,
    ) -> dict:
        """Create (owned by ``tenant``) or re-open; another tenant's session raises ``SessionNotFound``.
        ``roles`` (index = channel) replace the session's roles when given."""
        ...

    async def close_session(self, session_id: str, reason: str | None = None) -> bool:
        """End an active session; True when this call ended it."""
        ...

    async def heartbeat(self, session_id: str) -> None:
        """A live stream's sign of life: its session is not stale."""
        ...

    async def sweep(self, rest_idle_s: float = 900.0, stream_stale_s: float = 90.0) -> int:
        """End idle REST sessions and stale stream sessions; returns how many it ended."""
        ...

    async def recover(self, stream_stale_s: float = 90.0) -> int:
        """At server start: end the stream sessions a previous process left active."""
        ...

    async def sweep_ended(self, rest_idle_s: float = 900.0, stream_stale_s: float = 90.0) -> list[str]: ...

    async def recover_ended(self, stream_stale_s: float = 90.0) -> list[str]: ...

    async def append_result(self, session_id: str, result: dict[str, Any]) -> int: ...

    async def append(self, session_id: str, result: dict[str, Any]) -> Appended: ...

    async def alerts(self, session_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        """Stored alerts whose result ``seq > after``, in order."""
        ...

    async def get_session(self, session_id: str) -> dict | None: ...

    async def list_sessions(
        self, state: str | None = None, limit: int = 100, tenant: str | None = None
    ) -> list[dict]: ...

    async def results(
        self, session_id: str, after: int = 0, wait_s: float = 0.0, limit: int = 1000
    ) -> list[dict]: ...

    async def delete_session(self, session_id: str) -> bool: ...

    async def ping(self) -> None:
        """Raise when the store cannot serve (used by ``/readyz``)."""
        ...

    async def close(self) -> None: ...
