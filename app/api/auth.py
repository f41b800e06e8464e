"""API-key check for the /v1 routes and /predict: ``Authorization: Bearer <key>``.

With no key configured (``EMOTION_API_KEYS`` empty) the routes are open. WebSocket clients, which
browsers cannot give an Authorization header, may pass ``?api_key=<key>`` instead.
Thread-safety: stateless apart from reading settings.
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from app.errors import UnauthorizedError


def _matches(candidate: str, keys: list[str]) -> bool:
    # compare_digest against every key: no early exit that would leak which prefix matched
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def check_api_key(conn: HTTPConnection) -> None:
    keys = conn.app.state.settings.api_keys
    if not keys:
        return
    header = conn.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        candidate = token.strip()
    elif conn.scope["type"] == "websocket" and conn.query_params.get("api_key"):
        candidate = conn.query_params["api_key"]
    else:
        raise UnauthorizedError("missing API key: send Authorization: Bearer <key>")
    if not _matches(candidate, keys):
        raise UnauthorizedError("invalid API key")


async def require_api_key(conn: HTTPConnection) -> None:
    """FastAPI dependency (HTTP and WebSocket routes)."""
    check_api_key(conn)
