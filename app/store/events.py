"""The event bus behind the server-sent events: ``created``, ``result``, ``alert``, ``ended``, ``deleted``.

``PublishingStore`` (``app.store.publishing``) publishes an ``Event`` whenever a session starts (or
is re-opened), gets a result, fires an alert, ends or is deleted. Subscribers (the SSE routes in
``app.api.events``, long polls waiting for a session to appear) receive the events published after
they subscribed, for one session or for all of them.

Two buses, picked by ``open_bus`` after the session store:

* ``MemoryEventBus`` (SQLite store: a SQLite file belongs to one server process): events go straight
  to this process's subscribers; the last ``history`` events stay in a ring for resumption.
* ``RedisEventBus`` (Redis store, several replicas): ``publish`` is an ``XADD`` to the stream
  ``<prefix>events`` capped with ``MAXLEN ~ history``; each process runs ONE reader task
  (``XREAD BLOCK`` on a connection of its own, started by the first subscription) that fans the
  events out to its local subscribers. So an SSE client costs no Redis connection, however many
  there are: the store's long-poll pool (``redis_max_long_polls``) is not touched, and publishes use
  a small pool of their own (``PUBLISH_CONNECTIONS``). A reader that loses Redis retries with
  back-off from the last id it saw, so a short outage loses nothing that is still in the stream.

Event ids: the Redis entry id (``<ms>-<n>``), or ``<bus start ms>-<n>`` in memory; both order like
Redis ids (``id_key``). ``history(after)`` returns the retained events newer than an id
(``Last-Event-ID`` of ``GET /v1/events``).

Back-pressure: every subscription has a bounded queue (``queue_size`` events). A subscriber that
falls that far behind is *dropped*: its queue is emptied at once (the memory is freed, nothing grows)
and its next ``get`` raises ``SubscriptionDropped``; the SSE route then closes the connection, and
the client resumes with ``Last-Event-ID`` (per-session streams replay from the durable store).
``max_subscribers`` bounds the subscriptions of a process (``TooManySubscribers``: HTTP 503).

Listeners (``add_listener``) are called for every event this process publishes, once per event in
the whole cluster (on the replica that published it, not on every reader): the hook for webhooks on
``ended``. A listener may be a plain function or a coroutine function (run as a task); its errors
are logged, never raised into the publisher.

Thread-safety: the subscriber registry takes a lock; an event for a subscriber of another event loop
is handed over with ``call_soon_threadsafe``. A ``RedisEventBus`` belongs to one event loop (its
connections and reader task), like ``RedisStore``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

log = logging.getLogger(__name__)

EventType = Literal["created", "result", "alert", "ended", "deleted"]
EVENT_TYPES: tuple[str, ...] = ("created", "result", "alert", "ended", "deleted")
PUBLISH_CONNECTIONS = 4  # Redis connections a bus uses for XADD / XRANGE (plus one for its reader)


@dataclass(frozen=True)
class Event:
    """One change of one session. ``data``: the session JSON (created, ended), the stored result
    (result), the alert (alert), ``{"id"}`` (deleted). ``tenant``: the session's owner (scoping)."""

    type: str
    session_id: str
    tenant: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    id: str = ""


Listener = Callable[[Event], Awaitable[None] | None]


def id_key(event_id: str) -> tuple[int, int]:
    """Sort key of an event id (``<ms>-<n>``); malformed ids sort first."""
    head, _, tail = (event_id or "").partition("-")
    try:
        return int(head), int(tail or 0)
    except ValueError:
        return -1, -1


class SubscriptionDropped(Exception):
    """The subscriber fell ``queue_size`` events behind (or the bus closed): it must reconnect."""


class EventsUnavailable(Exception):
    """The bus cannot reach Redis (``app.errors`` convention: 503)."""

    status = 503
    code = "store_unavailable"
    retry_after: float | None = 5.0


class TooManySubscribers(Exception):
    """``max_subscribers`` subscriptions are open in this process (``app.errors`` convention: 503)."""

    status = 503
    code = "too_many_event_streams"
    retry_after: float | None = 5.0


_DROPPED = object()  # queue sentinel: the subscription was dropped or the bus closed


class Subscription:
    """Events of one session (or of all, ``session_id=None``) from the moment of subscribing.

    Use as ``async with await bus.subscribe(...) as sub: ev = await sub.get(timeout)``.
    """

    def __init__(self, bus: _Fanout, session_id: str | None, queue_size: int):
        self.session_id = session_id
        self.queue_size = max(1, int(queue_size))
        self.loop = asyncio.get_running_loop()
        self.dropped = False
        self.closed = False
        self._bus = bus
        # one slot more than the limit: room for the sentinel of a full queue
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self.queue_size + 1)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def offer(self, event: Event) -> None:
        """Queue ``event`` (on this subscription's loop); drop the subscription when it is full."""
        if self.closed or self.dropped:
            return
        if self._queue.qsize() >= self.queue_size:
            self.drop()
            return
        self._queue.put_nowait(event)

    def drop(self) -> None:
        """Free the queue, wake the reader with the sentinel, leave the bus (this loop only)."""
        if self.dropped:
            return
        self.dropped = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_DROPPED)
        self._bus._remove(self)

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds without one; ``SubscriptionDropped``
        once dropped."""
        if self.closed or (self.dropped and self._queue.empty()):
            raise SubscriptionDropped("the event subscription was closed or dropped")
        if not self._queue.empty():
            item = self._queue.get_nowait()
        else:
            # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation that
            # arrives as the item does, and a stream's task would then not stop
            getter = asyncio.ensure_future(self._queue.get())
            try:
                done, _ = await asyncio.wait({getter}, timeout=timeout)
            except asyncio.CancelledError:
                getter.cancel()  # an item it already took is dropped with the cancelled reader
                raise
            if not done:
                getter.cancel()
                return None
            item = getter.result()
        if item is _DROPPED:
            raise SubscriptionDropped(f"fell more than {self.queue_size} events behind, or the bus closed")
        return cast(Event, item)

    def close(self) -> None:
        self.closed = True
        self._bus._remove(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class _Fanout:
    """Subscriber registry, delivery to local subscribers, listeners: what both buses share."""

    def __init__(self, history: int = 1000, max_subscribers: int = 1000):
        self.history_size = max(1, int(history))
        self.max_subscribers = max(1, int(max_subscribers))
        self._lock = threading.Lock()
        self._by_session: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._count = 0
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task] = set()  # running async listeners (strong references)
        self.closed = False

    # --- subscribers -----------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return self._count

    def _register(self, session_id: str | None, queue_size: int) -> Subscription:
        if self.closed:
            raise RuntimeError("the event bus is closed")
        sub = Subscription(self, session_id, queue_size)
        with self._lock:
            if self._count >= self.max_subscribers:
                raise TooManySubscribers(f"{self._count} event streams are open on this server; retry later")
            if session_id is None:
                self._all.add(sub)
            else:
                self._by_session.setdefault(session_id, set()).add(sub)
            self._count += 1
        return sub

    async def subscribe(self, session_id: str | None = None, queue_size: int = 256) -> Subscription:
        """Events published from now on, of ``session_id`` (None: every session)."""
        return self._register(session_id, queue_size)

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            bucket = self._all if sub.session_id is None else self._by_session.get(sub.session_id)
            if bucket is None or sub not in bucket:
                return
            bucket.discard(sub)
            if sub.session_id is not None and not bucket:
                del self._by_session[sub.session_id]
            self._count -= 1

    def _deliver(self, event: Event) -> None:
        with self._lock:
            targets = [*self._all, *self._by_session.get(event.session_id, ())]
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for sub in targets:
            if sub.loop is here:
                sub.offer(event)
                continue
            try:
                sub.loop.call_soon_threadsafe(sub.offer, event)
            except RuntimeError:  # that loop is closed: its subscriber is gone
                self._remove(sub)

    def _drop_all(self) -> None:
        with self._lock:
            subs = [*self._all, *(s for b in self._by_session.values() for s in b)]
        for sub in subs:
            try:
                if sub.loop is asyncio.get_running_loop():
                    sub.drop()
                else:
                    sub.loop.call_soon_threadsafe(sub.drop)
            except RuntimeError:
                self._remove(sub)

    # --- listeners -------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every event this process publishes (see the module docstring)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify_listeners(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                out = listener(event)
            except Exception:
                log.exception("event listener %r failed on %s", listener, event.type)
                continue
            if inspect.isawaitable(out):
                task = asyncio.ensure_future(out)
                self._tasks.add(task)
                task.add_done_callback(self._listener_done)

    def _listener_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event listener failed", exc_info=task.exception())


class MemoryEventBus(_Fanout):
    """Events within one process (the SQLite store's bus)."""

    def __init__(self, history: int = 1000, max_subscribers: int = 1000):
        super().__init__(history, max_subscribers)
        self._ring: deque[Event] = deque(maxlen=self.history_size)
        self._epoch = int(time.time() * 1000)  # ids keep growing across restarts
        self._n = 0

    async def publish(self, event: Event) -> Event:
        with self._lock:
            self._n += 1
            event = replace(event, id=f"{self._epoch}-{self._n}")
            self._ring.append(event)
        self._deliver(event)
        self._notify_listeners(event)
        return event

    async def history(self, after: str, limit: int = 1000) -> list[Event]:
        floor = id_key(after)
        with self._lock:
            newer = [e for e in self._ring if id_key(e.id) > floor]
        return newer[: max(0, int(limit))]

    async def close(self) -> None:
        self.closed = True
        self._drop_all()


class RedisEventBus(_Fanout):
    """Events shared by every replica through one capped Redis stream (see the module docstring)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "emotion:",
        history: int = 1000,
        max_subscribers: int = 1000,
        client=None,
        block_s: float = 2.0,
    ):
        import redis.asyncio as aioredis
        from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool, parse_url

        super().__init__(history, max_subscribers)
        self.key = prefix + "events"
        self.block_s = block_s
        self._own_clients = client is None
        if client is not None:
            self._w = self._rb = client
        else:
            opts: dict[str, Any] = {**parse_url(url), "decode_responses": True}
            opts.pop("max_connections", None)
            self._w = aioredis.Redis.from_pool(
                BlockingConnectionPool(**opts, max_connections=PUBLISH_CONNECTIONS, timeout=10.0)
            )
            self._rb = aioredis.Redis.from_pool(
                ConnectionPool(**{**opts, "socket_timeout": block_s + 10.0}, max_connections=1)
            )
        self._reader: asyncio.Task | None = None
        self._started: asyncio.Future[None] | None = None

    async def publish(self, event: Event) -> Event:
        fields = {
            "t": event.type,
            "s": event.session_id,
            "n": event.tenant or "",
            "d": json.dumps(event.data, separators=(",", ":")),
        }
        eid = await self._w.xadd(self.key, fields, maxlen=self.history_size, approximate=True)  # type: ignore[arg-type]
        event = replace(event, id=str(eid))
        self._notify_listeners(event)  # local subscribers get it from the reader, like every replica's
        return event

    @staticmethod
    def _decode(eid: str, fields: dict[str, str]) -> Event:
        return Event(
            type=fields.get("t", ""),
            session_id=fields.get("s", ""),
            tenant=fields.get("n") or None,
            data=json.loads(fields.get("d") or "{}"),
            id=eid,
        )

    async def subscribe(self, session_id: str | None = None, queue_size: int = 256) -> Subscription:
        """Registers first, then makes sure the reader runs: it reads from the stream's end as of its
        start, so every event XADDed after this returns is delivered."""
        sub = self._register(session_id, queue_size)
        try:
            await self._ensure_reader()
        except Exception as exc:
            sub.close()
            raise EventsUnavailable(f"events are not available: {exc}") from exc
        except BaseException:
            sub.close()
            raise
        return sub

    async def _ensure_reader(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="event-bus-reader")
        await asyncio.shield(self._started)

    async def _last_id(self) -> str:
        last = cast(list[tuple[str, dict[str, str]]], await self._w.xrevrange(self.key, "+", "-", count=1))
        return last[0][0] if last else "0-0"

    async def _read_loop(self) -> None:
        assert self._started is not None
        backoff = 0.1
        last: str | None = None
        while not self.closed:
            try:
                if last is None:
                    last = await self._last_id()
                    if not self._started.done():
                        self._started.set_result(None)
                got = cast(
                    "list[tuple[str, list[tuple[str, dict[str, str]]]]] | None",
                    await self._rb.xread({self.key: last}, block=max(1, int(self.block_s * 1000)), count=500),
                )
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: retry from the last id seen (nothing is skipped)
                if self.closed:
                    return
                log.warning("event bus: reading %s failed (%s); retrying in %.1f s", self.key, exc, backoff)
                if not self._started.done() and last is None and backoff >= 1.6:
                    self._started.set_exception(exc)  # the first subscriber gets the error (503 upstream)
                    self._started = None
                    return
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            for _stream, entries in got or []:
                for eid, fields in entries:
                    last = eid
                    self._deliver(self._decode(eid, fields))

    async def history(self, after: str, limit: int = 1000) -> list[Event]:
        if id_key(after) < (0, 0):
            return []
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await self._w.xrange(self.key, f"({after}", "+", count=max(1, int(limit))),
        )
        return [self._decode(eid, fields) for eid, fields in entries]

    async def close(self) -> None:
        """Stop the reader and the connections; takes at most about ``block_s`` + 3 s.

        The reader is not cancelled mid-read: a task cancelled inside redis-py's blocking read was
        seen to stay stuck there. It sees ``closed`` when its ``XREAD BLOCK`` returns (``block_s``)
        and ends; every step here is bounded, so a shutdown never hangs on Redis."""
        self.closed = True
        self._drop_all()
        reader = self._reader
        if reader is not None and not reader.done():
            done, _ = await asyncio.wait({reader}, timeout=self.block_s + 1.0)
            if not done:
                reader.cancel()  # not awaited (see above)
        if self._own_clients:
            for client in (self._w, self._rb):
                await asyncio.wait({asyncio.ensure_future(client.aclose())}, timeout=1.0)


EventBus = MemoryEventBus | RedisEventBus


def open_bus(settings, store=None) -> EventBus:
    """The bus that goes with ``store``: Redis for a ``RedisStore`` (same server and key prefix),
    memory otherwise."""
    from app.store.redis import RedisStore

    backend = getattr(store, "backend", store)
    common = {"history": settings.events_history, "max_subscribers": settings.sse_max_clients}
    if isinstance(backend, RedisStore):
        return RedisEventBus(backend.url, backend.prefix, client=backend.injected_client, **common)
    return MemoryEventBus(**common)


__all__ = [
    "EVENT_TYPES",
    "Event",
    "EventBus",
    "EventsUnavailable",
    "MemoryEventBus",
    "RedisEventBus",
    "Subscription",
    "SubscriptionDropped",
    "TooManySubscribers",
    "id_key",
    "open_bus",
]
