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
        self, session_id: str, metadata: dict[str, Any] | None = None, source: str = "stream"
    ) -> dict: ...

    async def close_session(self, session_id: str) -> None: ...

    async def append_result(self, session_id: str, result: dict[str, Any]) -> int: ...

    async def get_session(self, session_id: str) -> dict | None: ...

    async def list_sessions(self, state: str | None = None, limit: int = 100) -> list[dict]: ...

    async def results(
        self, session_id: str, after: int = 0, wait_s: float = 0.0, limit: int = 1000
    ) -> list[dict]: ...

    async def delete_session(self, session_id: str) -> bool: ...

    async def ping(self) -> None:
        """Raise when the store cannot serve (used by ``/readyz``)."""
        ...

    async def close(self) -> None: ...
