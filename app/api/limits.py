"""HTTP server limits: request-header size and read deadline, body-read deadline, idle and concurrency.

uvicorn alone holds a connection that sends its headers slowly (or never finishes them) forever, and
a request whose ``Content-Length`` is larger than its body waits forever for the rest. Here:

* ``LimitedH11Protocol``: uvicorn's h11 protocol (h11 caps the header block at
  ``http_max_header_bytes``: larger -> 431) plus a header-read deadline: a connection whose request
  headers are not complete ``http_header_timeout_s`` after their first byte (or after connecting)
  gets ``408`` and is closed;
* ``BodyDeadlineMiddleware`` (ASGI, in ``create_app``, so it applies under any server): the whole
  body must arrive within ``body_read_timeout_s`` of the first read, else ``408 request_timeout``
  (JSON ``{error, detail}``, ``Connection: close``);
* long-lived responses (server-sent events, ``app.api.sse``) register a control object in their
  scope under ``LONG_RESPONSE``: the protocol calls its ``server_shutdown()`` when the server shuts
  down (uvicorn would otherwise wait for the stream to end, which it never does by itself) and gives
  it ``abort`` (drop the connection) when writing pauses, for a client that stops reading;
* ``server_options(settings)``: the uvicorn options (``cli serve`` and the tests use them): the
  protocol above, the header cap, ``timeout_keep_alive`` (idle keep-alive connections) and
  ``limit_concurrency`` (503 beyond).

Thread-safety: the protocol runs on the server's event loop (one instance per connection); the
middleware is stateless apart from per-request locals.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol


class BodyReadTimeout(Exception):
    """The request body did not arrive in time (HTTP 408; ``app.errors`` convention)."""

    status = 408
    code = "request_timeout"


class BodyDeadlineMiddleware:
    """Fails a request whose body takes longer than ``timeout_s`` to arrive (from the first read)."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.timeout_s <= 0:
            await self.app(scope, receive, send)
            return
        deadline: float | None = None
        body_done = False
        timed_out = False

        async def limited_receive() -> Message:
            nonlocal deadline, body_done, timed_out
            if body_done:  # after the body only http.disconnect comes: no deadline on waiting for it
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                timed_out = True
                raise BodyReadTimeout(
                    f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def closing_send(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":  # the rest of the body is unread
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


_TIMEOUT_BODY = b'{"error": "request_timeout", "detail": "the request headers did not arrive in time"}'
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


LONG_RESPONSE = "emotion.long_response"  # scope key of a long-lived response's control (app.api.sse)
SERVER_SHUTDOWN = "emotion.server_shutdown"  # scope key set when the server shut down mid-request


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request's headers, and the hooks of
    long-lived responses (``LONG_RESPONSE``)."""

    header_timeout_s: float = 10.0  # set by ``server_options`` on a subclass

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _waiting_for_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm_header_timer()
        elif self._waiting_for_headers():
            # Bytes of a request whose headers are not complete yet (an idle keep-alive connection
            # is left to uvicorn's keep-alive timer, armed after each response).
            self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting_for_headers():
            return
        self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _long_response(self) -> Any:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return None
        return cycle.scope.get(LONG_RESPONSE)

    def shutdown(self) -> None:
        control = self._long_response()
        if self.cycle is not None and not self.cycle.response_complete:
            # a long response that has not registered yet ends as soon as it does
            scope: dict[str, Any] = self.cycle.scope  # type: ignore[assignment]  # uvicorn's TypedDict
            scope[SERVER_SHUTDOWN] = True
        super().shutdown()
        if control is not None:
            control.server_shutdown()

    def pause_writing(self) -> None:
        super().pause_writing()
        control = self._long_response()
        if control is not None:
            control.abort = self.transport.abort


def server_options(settings) -> dict[str, Any]:
    """uvicorn keyword arguments enforcing the HTTP limits of ``settings``."""
    protocol = type(
        "LimitedH11Protocol",
        (LimitedH11Protocol,),
        {"header_timeout_s": float(settings.http_header_timeout_s)},
    )
    return {
        "http": protocol,
        "h11_max_incomplete_event_size": int(settings.http_max_header_bytes),
        "timeout_keep_alive": int(settings.http_keep_alive_s),
        "limit_concurrency": int(settings.http_limit_concurrency) or None,
    }
