"""Server-sent events: ``EventStreamResponse`` sends what an async iterator yields as ``text/event-stream``.

Why not a library: ``sse-starlette`` is not a dependency, and FastAPI's own ``EventSourceResponse``
(FastAPI >= 0.135; this project declares >= 0.110) streams a generator without a send deadline (a
client that stops reading holds its connection until TCP gives up) and with a fixed keep-alive.
Both leave a stream open when uvicorn shuts down (``sse-starlette`` patches
``uvicorn.Server.handle_exit`` for that, with a history of breakage), which the protocol class this
server already runs (``app.api.limits.LimitedH11Protocol``) does more simply. What remains is small:
framing, keep-alive (the route's generator yields ``KEEPALIVE``), disconnect, a bounded send.

Behaviour:

* Framing: ``ServerSentEvent(data, event, id, retry_ms)`` -> ``id:``, ``event:``, ``retry:`` and one
  ``data:`` line of compact JSON (JSON never contains a raw newline); ``KEEPALIVE`` is the comment
  ``: keep-alive``. Headers: ``Cache-Control: no-cache`` and ``X-Accel-Buffering: no`` (nginx must
  not buffer the stream).
* The iterator decides what to send and when (keep-alives included); the response only sends.
  ``on_close`` runs when the response ends, whatever the reason: release what the route acquired
  for the iterator there (an iterator that never started runs no ``finally``).
* Client disconnect: a task waits for ``http.disconnect`` and then cancels the sender; the iterator is
  closed (``aclose``) either way, so its ``finally`` / ``async with`` blocks run. Nothing is logged
  above DEBUG for a client that goes away.
* A client that stops reading: each send is bounded by ``send_timeout_s``; at the deadline the
  connection is aborted (through the protocol's ``abort`` when it gave one, see below) and the
  response ends; logged at INFO.
* Server shutdown: uvicorn waits for open responses before it stops, and an event stream never ends
  by itself. The response registers a ``LongResponse`` in its scope (``app.api.limits.LONG_RESPONSE``);
  ``LimitedH11Protocol`` calls its ``server_shutdown()`` when the server shuts down (the stream then
  ends cleanly and the client reconnects elsewhere) and hands it ``abort`` when writing pauses. Under
  another server the stream ends when the client goes away (or at uvicorn's
  ``timeout_graceful_shutdown``).

Thread-safety: one response per request, on the request's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.limits import LONG_RESPONSE, SERVER_SHUTDOWN

log = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
FINAL_SEND_TIMEOUT_S = 1.0  # the closing empty chunk, after which uvicorn finishes the response


@dataclass(frozen=True)
class ServerSentEvent:
    data: Any = None
    event: str | None = None
    id: str | int | None = None
    retry_ms: int | None = None

    def encode(self) -> bytes:
        lines = []
        if self.id is not None:
            lines.append(f"id: {self.id}")
        if self.event is not None:
            lines.append(f"event: {self.event}")
        if self.retry_ms is not None:
            lines.append(f"retry: {int(self.retry_ms)}")
        if self.data is not None:
            text = self.data if isinstance(self.data, str) else json.dumps(self.data, separators=(",", ":"))
            lines += [f"data: {line}" for line in text.split("\n")]
        return ("\n".join(lines) + "\n\n").encode()


class LongResponse:
    """What a long-lived response offers the HTTP protocol (duck-typed by ``LimitedH11Protocol``)."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.abort: Callable[[], None] | None = None  # set by the protocol: drop the connection now

    def server_shutdown(self) -> None:
        self.closing.set()


class ClientNotReading(Exception):
    pass


class EventStreamResponse(Response):
    # None for FastAPI's OpenAPI generator (``response_class=``): the routes document their 200 as
    # text/event-stream themselves, and their error bodies stay application/json.
    media_type = None
    MEDIA_TYPE = "text/event-stream"

    def __init__(
        self,
        messages: AsyncIterator[ServerSentEvent | bytes] | None = None,
        send_timeout_s: float = 10.0,
        headers: dict[str, str] | None = None,
        status_code: int = 200,  # FastAPI reads the default for OpenAPI
        on_close: Callable[[], None] | None = None,
    ):
        super().__init__(content=None, status_code=status_code, headers=headers, media_type=self.MEDIA_TYPE)
        # no content-length (Starlette sets 0 for an empty body): the stream is open-ended
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.raw_headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.messages = messages
        self.send_timeout_s = send_timeout_s
        # always called at the end, even when the iterator never started (its own finally would not run)
        self.on_close = on_close
        self._stopping = False

    @staticmethod
    async def _send_bounded(send: Send, message: dict, timeout: float) -> None:
        # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation
        task = asyncio.ensure_future(send(message))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            raise ClientNotReading
        task.result()

    async def _pump(self, send: Send) -> None:
        assert self.messages is not None
        async for item in self.messages:
            if self._stopping:  # belt and braces: a cancellation lost in a library still stops us
                return
            chunk = item if isinstance(item, bytes) else item.encode()
            await self._send_bounded(
                send, {"type": "http.response.body", "body": chunk, "more_body": True}, self.send_timeout_s
            )

    @staticmethod
    async def _stop(task: asyncio.Future) -> None:
        """Cancel ``task`` until it is done (a single cancel can be lost, see ``_send_bounded``)."""
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)

    @staticmethod
    async def _until_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        control = LongResponse()
        scope[LONG_RESPONSE] = control
        if scope.get(SERVER_SHUTDOWN):  # the server began shutting down while this request was routed
            control.server_shutdown()
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(self._until_disconnect(receive))
        closing = asyncio.ensure_future(control.closing.wait())
        stalled = False
        try:
            done, _ = await asyncio.wait({pump, gone, closing}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done and not pump.cancelled() and pump.exception() is not None:
                exc = pump.exception()
                if isinstance(exc, ClientNotReading):
                    stalled = True
                    log.info(
                        "event stream: the client did not read for %g s; disconnecting it",
                        self.send_timeout_s,
                    )
                else:
                    log.error("event stream failed", exc_info=exc)
        finally:
            self._stopping = True
            await self._stop(pump)
            await self._stop(closing)
            if self.messages is not None and hasattr(self.messages, "aclose"):
                await self.messages.aclose()
            if self.on_close is not None:
                self.on_close()
        if not stalled and not gone.done():
            try:  # finish the response (returns at once when the client is already gone)
                await self._send_bounded(
                    send,
                    {"type": "http.response.body", "body": b"", "more_body": False},
                    FINAL_SEND_TIMEOUT_S,
                )
            except ClientNotReading:  # e.g. dropped for falling behind, and not reading either
                stalled = True
        if stalled:
            if control.abort is not None:
                control.abort()  # the protocol drops the connection: uvicorn sees a disconnect, not an error
                await asyncio.wait({gone}, timeout=FINAL_SEND_TIMEOUT_S)
            else:  # another server: returning unfinished makes it close the connection (and log it)
                log.warning("event stream: cannot abort a connection that does not read on this server")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
