"""Operability: request/session ids in every log line, JSON logs, unknown-setting warnings, redaction.

* ``REQUEST_ID`` / ``SESSION_ID``: context variables. ``RequestIdMiddleware`` sets the request id
  for each HTTP request and WebSocket (from ``X-Request-ID`` when the client sent a sane one, else a
  new uuid4 hex) and echoes it in the HTTP response headers; the stream handler sets the session id
  once it is known. asyncio tasks copy the context when created, so the stream's own tasks (finals,
  heartbeat) log with the same ids.
* ``ContextFilter``: a *handler* filter (handler filters also see records propagated from child
  loggers) that puts ``request_id`` and ``session_id`` on every record (``-`` when unset).
* ``JsonFormatter``: one JSON object per line (``ts, level, logger, message, request_id, session_id``
  and ``exc`` when there is a traceback). ``configure_logging(level, fmt)`` installs it (``json``) or
  the plain text format (the default).
* ``unknown_env_vars()``: ``EMOTION_*`` variables (environment and ``.env``) that are no setting,
  each with the closest known name (difflib), logged as a warning at start-up.
* ``redacted_settings(settings)``: the effective settings as a JSON-able dict, secrets replaced.

Thread-safety: context variables are per thread/task; the filter and formatter are stateless.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
SESSION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # no spaces, quotes or control characters in logs
ENV_PREFIX = "EMOTION_"
# Variables with the prefix that are read by something else than Settings (the stream client).
OTHER_KNOWN_VARS = frozenset({"EMOTION_API_KEY"})
REDACTED = "***"


# --- log records ------------------------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``session_id`` (``-`` when unset) to every record; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get() or "-"
        if not hasattr(record, "session_id"):
            record.session_id = SESSION_ID.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
            "session_id": getattr(record, "session_id", None) or SESSION_ID.get(),
        }
        for key in ("request_id", "session_id"):
            if line[key] == "-":
                line[key] = None
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Root handler on stderr with ``ContextFilter``; JSON lines when ``fmt == "json"``.

    With JSON, uvicorn's own loggers are made to propagate to the root handler (call uvicorn with
    ``log_config=None``), so its lines are JSON too.
    """
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
            logger.setLevel(logging.NOTSET)  # the root level decides, as for every other logger
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# --- request ids ------------------------------------------------------------------------------


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1").strip()
            return text if _SANE_ID.match(text) else None
    return None


class RequestIdMiddleware:
    """Sets ``REQUEST_ID`` per HTTP request / WebSocket; echoes it as ``X-Request-ID`` (HTTP)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        session_token = SESSION_ID.set(None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)
        finally:
            SESSION_ID.reset(session_token)
            REQUEST_ID.reset(token)


# --- unknown EMOTION_* variables ----------------------------------------------------------------


def known_env_vars() -> set[str]:
    from app.settings import Settings

    return {ENV_PREFIX + name.upper() for name in Settings.model_fields} | set(OTHER_KNOWN_VARS)


def _dotenv_names(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        from dotenv import dotenv_values
    except ImportError:  # pragma: no cover - python-dotenv comes with pydantic-settings' .env support
        return []
    return list(dotenv_values(path))


def unknown_env_vars(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> list[tuple[str, str | None]]:
    """``[(name, closest known name or None)]`` for ``EMOTION_*`` variables that are no setting."""
    environ = os.environ if environ is None else environ
    names = [n for n in environ if n.upper().startswith(ENV_PREFIX)]
    if env_file is not None:
        names += [n for n in _dotenv_names(Path(env_file)) if n.upper().startswith(ENV_PREFIX)]
    known = known_env_vars()
    out: list[tuple[str, str | None]] = []
    for name in dict.fromkeys(names):  # keep order, drop duplicates
        if name.upper() in known:
            continue
        # compare what follows the shared prefix, or every name would look alike
        suffixes = sorted(k[len(ENV_PREFIX) :] for k in known)
        close = difflib.get_close_matches(name.upper()[len(ENV_PREFIX) :], suffixes, n=1, cutoff=0.6)
        out.append((name, ENV_PREFIX + close[0] if close else None))
    return out


def warn_unknown_env_vars(logger: logging.Logger | None = None, **kwargs) -> list[tuple[str, str | None]]:
    logger = logger or logging.getLogger("app.settings")
    unknown = unknown_env_vars(**kwargs)
    for name, close in unknown:
        hint = f"; did you mean {close}?" if close else ""
        logger.warning("unknown setting %s is ignored%s", name, hint)
    return unknown


# --- redaction ---------------------------------------------------------------------------------

_SECRET_FIELD = re.compile(r"(keys?|secret|password|token)$")


def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}"))


def redacted_settings(settings) -> dict[str, Any]:
    """``settings.model_dump(mode="json")`` with API/admin keys, secrets and URL passwords replaced."""
    data = settings.model_dump(mode="json")
    for name, value in data.items():
        if _SECRET_FIELD.search(name):
            if isinstance(value, list):
                data[name] = [REDACTED for _ in value]
            elif value:
                data[name] = REDACTED
        elif name.endswith("_url") and isinstance(value, str):
            data[name] = _redact_url(value)
    return data
