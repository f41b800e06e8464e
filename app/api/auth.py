"""API keys, tenants, origin check and rate limits for the /v1 routes and /predict.

Keys: ``Authorization: Bearer <key>``; WebSocket clients and server-sent event streams
(``EventSource``), which browsers cannot give an Authorization header, may pass ``?api_key=<key>``
instead (the event routes use ``require_api_key_or_query``) (masked in the server logs by
``RedactSecrets``). With no key configured (``EMOTION_API_KEYS`` and ``EMOTION_ADMIN_KEYS`` empty)
the routes are open and every caller is an admin.

Tenants: an ``EMOTION_API_KEYS`` entry is ``tenant:key`` (tenant = ``[A-Za-z0-9][A-Za-z0-9._@-]*``,
at most 64 characters; several keys may share a tenant) or a plain ``key``, which is its own
tenant, named ``sha256:<16 hex digits of the key's SHA-256>`` so the key itself is never stored or
logged. A plain key that contains ``:`` must therefore be written ``tenant:key``. A session
belongs to the tenant that created it; other tenants get 404 for it (as if it did not exist).
``EMOTION_ADMIN_KEYS`` (same syntax) see, continue and delete every session; sessions they create
have no tenant. Sessions without a tenant (created by an admin, with auth off, or before tenants
existed) are visible to admins only while auth is on, and to everyone while it is off.

Origin: a request that changes state (POST, DELETE, ...) or opens a WebSocket, and carries an
``Origin`` header (browsers), must come from ``EMOTION_CORS_ORIGINS`` (``*`` = any) or from the
server's own origin (Origin host = Host header); else 403 ``origin_not_allowed`` (WS: close 1008).
Requests without an Origin header (curl, server-to-server) are not affected.

Rate limits (in-memory token buckets, **per server process**: N replicas allow N times as much):
wrong keys per client address (``auth_fail_burst``, refilled at ``auth_fail_per_min``); once
spent, every request from that address that needs a key is answered 429 ``rate_limited`` with
Retry-After, before its key is even looked at (so guessing stops paying off). Requests per valid
key (``key_rate_per_s`` sustained, ``key_rate_burst``). The client address is the one uvicorn
reports (``--proxy-headers`` / ``forwarded_allow_ips`` decide whether X-Forwarded-For counts).

Thread-safety: ``RateLimits`` takes a lock; everything else is stateless apart from settings.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from app.errors import ForbiddenOriginError, RateLimitedError, UnauthorizedError

TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def key_id(key: str) -> str:
    """The stored/logged identity of a key: never the key itself."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``tenant``: the owner name stored with sessions it creates (None: admin / open)."""

    tenant: str | None
    admin: bool
    key_id: str | None = None

    def can_see(self, owner: str | None) -> bool:
        return self.admin or (owner is not None and owner == self.tenant)

    @property
    def scope(self) -> str | None:
        """Tenant filter for listings; None = every session."""
        return None if self.admin else self.tenant


OPEN = Principal(tenant=None, admin=True)  # auth off


def _entry(raw: str, admin: bool) -> tuple[bytes, Principal]:
    name, sep, rest = raw.partition(":")
    if sep and rest and TENANT_PATTERN.fullmatch(name):
        key, tenant = rest, name
    else:
        key, tenant = raw, key_id(raw)
    return key.encode(), Principal(tenant=None if admin else tenant, admin=admin, key_id=key_id(key))


@lru_cache(maxsize=8)
def _keyring(api_keys: tuple[str, ...], admin_keys: tuple[str, ...]) -> tuple[tuple[bytes, Principal], ...]:
    return tuple(_entry(k, False) for k in api_keys) + tuple(_entry(k, True) for k in admin_keys)


def _lookup(candidate: str, ring: tuple[tuple[bytes, Principal], ...]) -> Principal | None:
    # compare_digest against every key: no early exit that would leak which prefix matched
    found: Principal | None = None
    raw = candidate.encode()
    for key, principal in ring:
        if hmac.compare_digest(raw, key):
            found = found or principal
    return found


class RateLimits:
    """Token buckets keyed by (kind, name), at most ``max_entries`` (least recently used dropped)."""

    def __init__(self, max_entries: int = 10_000, clock=time.monotonic):
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.clock = clock

    def _level(self, name: tuple[str, str], rate: float, burst: float, now: float) -> float:
        tokens, at = self._buckets.get(name, (burst, now))
        return min(burst, tokens + (now - at) * rate)

    def wait_s(self, name: tuple[str, str], rate: float, burst: float) -> float:
        """Seconds until one token is available (0 = now); takes nothing."""
        with self._lock:
            tokens = self._level(name, rate, burst, self.clock())
        return 0.0 if tokens >= 1 else (1 - tokens) / rate if rate > 0 else 3600.0

    def take(self, name: tuple[str, str], rate: float, burst: float) -> float:
        """Take one token; returns 0, or the seconds to wait when there is none (nothing taken)."""
        with self._lock:
            now = self.clock()
            tokens = self._level(name, rate, burst, now)
            if tokens < 1:
                return (1 - tokens) / rate if rate > 0 else 3600.0
            self._buckets[name] = (tokens - 1, now)
            self._buckets.move_to_end(name)
            while len(self._buckets) > self.max_entries:
                self._buckets.popitem(last=False)
            return 0.0


def _limits(conn: HTTPConnection) -> RateLimits:
    state = conn.app.state
    limits = getattr(state, "rate_limits", None)
    if limits is None:
        limits = state.rate_limits = RateLimits()
    return limits


def check_origin(conn: HTTPConnection) -> None:
    """403 for a state-changing request or a WebSocket from a foreign browser origin."""
    origin = conn.headers.get("origin")
    if origin is None:
        return
    if conn.scope["type"] == "http" and conn.scope.get("method", "GET") in _SAFE_METHODS:
        return
    allowed = conn.app.state.settings.cors_origins
    if "*" in allowed or origin in allowed or origin.rstrip("/") in allowed:
        return
    parts = urlsplit(origin)
    host = conn.headers.get("host", "")
    if parts.scheme in ("http", "https", "ws", "wss") and host and parts.netloc.lower() == host.lower():
        return  # same origin
    raise ForbiddenOriginError(f"origin {origin[:100]!r} is not allowed (EMOTION_CORS_ORIGINS)")


def check_api_key(conn: HTTPConnection, allow_query: bool = False) -> Principal:
    """The caller; ``?api_key=`` counts for WebSockets and, with ``allow_query``, for HTTP too."""
    settings = conn.app.state.settings
    if not settings.api_keys and not settings.admin_keys:
        return OPEN
    limits = _limits(conn)
    address = conn.client.host if conn.client else "?"
    fail_name = ("auth_fail", address)
    fail_rate, fail_burst = settings.auth_fail_per_min / 60.0, float(settings.auth_fail_burst)
    if fail_burst > 0:
        wait = limits.wait_s(fail_name, fail_rate, fail_burst)
        if wait > 0:
            raise RateLimitedError("too many wrong API keys from this address; retry later", wait)
    header = conn.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        candidate = token.strip()
    elif (conn.scope["type"] == "websocket" or allow_query) and conn.query_params.get("api_key"):
        candidate = conn.query_params["api_key"]
    else:
        raise UnauthorizedError("missing API key: send Authorization: Bearer <key>")
    principal = _lookup(candidate, _keyring(tuple(settings.api_keys), tuple(settings.admin_keys)))
    if principal is None:
        if fail_burst > 0:
            limits.take(fail_name, fail_rate, fail_burst)
        raise UnauthorizedError("invalid API key")
    if settings.key_rate_per_s > 0 and settings.key_rate_burst > 0:
        wait = limits.take(("key", principal.key_id or ""), settings.key_rate_per_s, settings.key_rate_burst)
        if wait > 0:
            raise RateLimitedError("too many requests with this API key; retry later", wait)
    return principal


def principal_of(conn: HTTPConnection) -> Principal:
    """The caller, as authenticated by ``require_api_key`` for this request."""
    principal = getattr(conn.state, "principal", None)
    return principal if isinstance(principal, Principal) else check_api_key(conn)


async def require_api_key(conn: HTTPConnection) -> None:
    """FastAPI dependency (HTTP routes): origin check, then the key; the caller goes in ``state``."""
    check_origin(conn)
    conn.state.principal = check_api_key(conn)


async def require_api_key_or_query(conn: HTTPConnection) -> None:
    """``require_api_key`` that also takes ``?api_key=`` (server-sent events: EventSource sets no headers)."""
    check_origin(conn)
    conn.state.principal = check_api_key(conn, allow_query=True)


# --- secrets in the server's logs ----------------------------------------------------------------

_SECRET_PARAM = re.compile(r"((?:^|[?&;])api_key=)[^&;\s\"']*", re.IGNORECASE)


def redact(text: str) -> str:
    return _SECRET_PARAM.sub(r"\1***", text) if "api_key=" in text.lower() else text


class RedactSecrets(logging.Filter):
    """Masks ``api_key=...`` in log records (uvicorn's access log and its WebSocket lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn")


def install_log_redaction() -> None:
    """Add ``RedactSecrets`` to uvicorn's loggers (once). Logger filters survive uvicorn's dictConfig."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
