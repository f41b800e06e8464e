"""The session store interface: durable, ordered results per session.

Two backends implement it: SQLite (embedded default, survives restarts) and Redis (shared by
several replicas). A *result* is a JSON-serialisable dict shaped like a streaming ``final`` message
(``channel``, ``start``, ``end``, ``text``, ``words``, ``emotion``, ...). ``append_result`` assigns
the next sequence number of the session (1, 2, 3, ...) atomically and returns it.
"""

from __future__ import annotations

from typing import Any, Protocol


class SessionStore(Protocol):
    async def open_session(
        self,
        session_id: str,
        metadata: dict[str, Any] | None = None,
        source: str = "stream",
        tenant: str | None = None,
    ) -> dict:
        """Create (owned by ``tenant``) or re-open; another tenant's session raises ``SessionNotFound``."""
        ...

    async def close_session(self, session_id: str, reason: str | None = None) -> None: ...

    async def heartbeat(self, session_id: str) -> None:
        """A live stream's sign of life: its session is not stale."""
        ...

    async def sweep(self, rest_idle_s: float = 900.0, stream_stale_s: float = 90.0) -> int:
        """End idle REST sessions and stale stream sessions; returns how many it ended."""
        ...

    async def recover(self, stream_stale_s: float = 90.0) -> int:
        """At server start: end the stream sessions a previous process left active."""
        ...

    async def append_result(self, session_id: str, result: dict[str, Any]) -> int: ...

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
