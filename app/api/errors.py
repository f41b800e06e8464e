"""One JSON error shape for every failure: ``{"error": code, "detail": message}``.

* exceptions following the ``status``/``code`` convention (``AudioError``, ``app.errors``, and any
  other package's errors that adopt it) -> that status;
* FastAPI/pydantic request validation -> 422 ``invalid_request`` (replacing FastAPI's own shape);
* Starlette HTTP errors (404, 405, ...) -> their status, code from the status;
* a client disconnect mid-request (``ClientDisconnect``) -> 499 ``client_closed``, logged at INFO;
* anything else -> 500 ``internal_error``, logged with its traceback; the detail reveals nothing.

503s (load shedding, not ready) are logged at INFO, other 5xx at WARNING.

``ErrorMiddleware`` catches what the routers raise, so no exception reaches the server's error
middleware (which would re-raise it). Thread-safety: stateless; safe on any event loop.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.errors import UnauthorizedError, status_and_code
from app.schemas import ErrorBody

log = logging.getLogger("app.api")

CLIENT_CLOSED = 499  # nginx's "client closed request": a disconnect mid-request, not a 500

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


# OpenAPI ``responses`` declarations, so the documented error bodies are the ones actually sent.
_Responses = dict[int | str, dict[str, object]]
VALIDATION_RESPONSES: _Responses = {
    422: {"model": ErrorBody, "description": "invalid request (`invalid_request`, or a more precise code)"}
}
AUTH_RESPONSES: _Responses = {
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    403: {
        "model": ErrorBody,
        "description": "browser request from an origin not allowed (`origin_not_allowed`)",
    },
    429: {
        "model": ErrorBody,
        "description": "too many wrong keys from this address, or requests with this key (`rate_limited`, "
        "with Retry-After)",
    },
}


def error_json(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, count: bool = True
) -> JSONResponse:
    if count:  # emotion_errors_total{type=code}
        metrics.ERRORS.labels(type=code).inc()
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def error_response(exc: BaseException) -> JSONResponse:
    """The response for any exception raised while serving a request."""
    if isinstance(exc, ClientDisconnect):
        # The client went away mid-request (e.g. mid-upload): not a server fault. Nobody reads this
        # answer; it records 499 (nginx's "client closed request") in the HTTP metrics.
        log.info("client disconnected before the request was read")
        return error_json(CLIENT_CLOSED, "client_closed", "the client closed the connection")
    mapped = status_and_code(exc)
    if mapped is None:
        log.error("unhandled error: %r", exc, exc_info=exc)
        return error_json(500, "internal_error", "internal server error (logged)")
    status, code = mapped
    if status == 503:  # load shedding / not ready: expected under load, the metric is enough
        log.info("%s (%d): %s", code, status, exc)
    elif status >= 500:
        log.warning("%s (%d): %s", code, status, exc)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(float(retry_after))))
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    detail = str(exc) or code.replace("_", " ")
    return error_json(status, code, detail, headers or None)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path", "header"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _on_validation_error(request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # registered for this exception type only
    return error_json(422, "invalid_request", _validation_detail(exc))


async def _on_http_error(request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)  # registered for this exception type only
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_json(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


class ErrorMiddleware:
    """Turns any exception escaping the routers into the JSON error shape (HTTP only)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # too late to answer with an error body
                log.error("error after the response started: %r", exc, exc_info=exc)
                raise
            await error_response(exc)(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_middleware(ErrorMiddleware)
