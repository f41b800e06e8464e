"""Signed webhook deliveries with retries: durable, at least once, to configured targets only.

An event (``job.done``, ``job.failed``, ``session.ended``) for a target becomes a *delivery* row in
the job store (``app.jobs.store``) before anything is sent, so a pending delivery survives a
restart. The dispatcher POSTs each due delivery with httpx and records the outcome:

* body: ``{"id": <delivery id>, "event": ..., "created_at": ISO-8601, "data": {...}}`` (JSON,
  UTF-8), the same bytes on every attempt;
* headers: ``X-Emotion-Event``, ``X-Emotion-Delivery`` (the delivery id: the receiver's
  idempotency key, since a delivery may arrive more than once), ``X-Emotion-Attempt`` (1, 2, ...)
  and ``X-Emotion-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>``;
* success: any 2xx answer within ``webhook_timeout_s``. Anything else (another status, a redirect:
  redirects are not followed, a timeout, a refused connection) is retried after
  ``webhook_backoff_s * 2**(attempt-1)`` seconds (capped at ``webhook_backoff_max_s``, plus up to
  25 % random jitter, so the delays grow and retries from many servers spread out), until
  ``webhook_max_attempts`` attempts, then the delivery is ``failed``.

How a receiver verifies a request (``verify`` below does exactly this)::

    t, v1 = fields of X-Emotion-Signature            # "t=1767312000,v1=5d41..."
    expected = hmac_sha256(secret, f"{t}." + raw_body).hexdigest()
    ok = compare_digest(expected, v1) and abs(now - t) <= 300     # reject replays of old requests

Use the raw body bytes as received (not re-serialised JSON), and de-duplicate on
``X-Emotion-Delivery``. Each attempt is signed with a fresh ``t``.

``enqueue(target_name, event_type, payload)`` (module level, for the session-end event bus) queues
an event on the running server's dispatcher. Targets, their secrets and the events they take come
only from ``EMOTION_WEBHOOKS`` (``app.jobs.targets``).

Thread-safety: a ``WebhookDispatcher`` belongs to the event loop that ``start``s it; its coroutines
may run concurrently on that loop, ``enqueue`` may also be awaited on another loop (its store calls
run on the store's own thread, and ``wake`` hands over to the dispatcher's loop). ``signature`` and
``verify`` are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from prometheus_client import Counter

from app.errors import InvalidOptionError
from app.jobs.store import Delivery, JobStore, iso
from app.jobs.targets import EVENTS, WebhookTarget
from app.metrics import REGISTRY

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Emotion-Signature"
DEFAULT_TOLERANCE_S = 300.0
JITTER = 0.25  # each delay is stretched by up to this fraction, at random

ATTEMPTS = Counter(
    "emotion_webhook_attempts_total",
    "webhook delivery attempts by outcome (delivered, retry, failed)",
    ["outcome"],
    registry=REGISTRY,
)


class UnknownWebhookError(InvalidOptionError):
    """The request names a webhook target that is not configured (or not for this caller)."""

    code = "unknown_webhook"


# --- signatures ---------------------------------------------------------------------------------


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def signature(secret: str | bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Emotion-Signature`` value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(_key(secret), f"{int(timestamp)}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={int(timestamp)},v1={mac}"


def verify(
    secret: str | bytes,
    body: bytes,
    header: str | None,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """What a receiver runs: is ``header`` a valid signature of the raw ``body`` made within
    ``tolerance_s`` of ``now``? (Several ``v1=`` entries are accepted, any one may match.)"""
    if not header:
        return False
    stamp: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                stamp = int(value)
            except ValueError:
                return False
        elif name == "v1" and value:
            macs.append(value)
    if stamp is None or not macs:
        return False
    now = time.time() if now is None else now
    if abs(now - stamp) > tolerance_s:
        return False
    expected = signature(secret, body, stamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, m) for m in macs)


def backoff_s(attempts: int, base_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """Delay after the ``attempts``-th failed attempt: base x 2^(attempts-1), capped, + jitter."""
    delay = min(max_s, base_s * (2.0 ** max(0, attempts - 1)))
    return delay * (1.0 + JITTER * rand())


# --- the dispatcher -----------------------------------------------------------------------------

_active: WebhookDispatcher | None = None


class WebhookDispatcher:
    """Sends the pending deliveries of one job store; at most ``webhook_concurrency`` at once."""

    def __init__(self, settings, store: JobStore, transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        self.store = store
        self.targets: Mapping[str, WebhookTarget] = settings.webhooks
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- targets -----------------------------------------------------------------------------

    def target_for(
        self, name: str, event: str, tenant: str | None = None, admin: bool = True
    ) -> WebhookTarget:
        """The configured target ``name`` if it takes ``event`` and this caller may use it; else
        ``UnknownWebhookError`` (the same answer in every case: configured names are not revealed)."""
        target = self.targets.get(name)
        if target is None or not target.takes(event) or not target.allows(tenant, admin):
            raise UnknownWebhookError(
                f"no webhook target {name!r} for {event} events is configured for this caller "
                "(EMOTION_WEBHOOKS)"
            )
        return target

    def new_delivery(
        self, target_name: str, event: str, payload: Mapping[str, Any], job_id: str | None = None
    ) -> Delivery:
        """A pending delivery of ``event`` to ``target_name``, due now (not stored: see ``enqueue``)."""
        if event not in EVENTS:
            raise ValueError(f"unknown webhook event {event!r}; expected one of {', '.join(EVENTS)}")
        now = time.time()
        delivery_id = "dlv_" + uuid.uuid4().hex
        body = json.dumps(
            {"id": delivery_id, "event": event, "created_at": iso(now), "data": dict(payload)},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return Delivery(
            id=delivery_id,
            target=target_name,
            event=event,
            body=body,
            created_at=now,
            updated_at=now,
            job_id=job_id,
            next_attempt_at=now,
        )

    async def enqueue(
        self, target_name: str, event_type: str, payload: Mapping[str, Any], job_id: str | None = None
    ) -> str | None:
        """Store a delivery of ``event_type`` to ``target_name`` and wake the sender; returns its id,
        or None when the target does not take this event. ``UnknownWebhookError`` for a name that
        is not configured."""
        target = self.targets.get(target_name)
        if target is None:
            raise UnknownWebhookError(f"no webhook target {target_name!r} is configured (EMOTION_WEBHOOKS)")
        if not target.takes(event_type):
            return None
        delivery = self.new_delivery(target_name, event_type, payload, job_id)
        await self.store.add_delivery(delivery)
        self.wake()
        return delivery.id

    async def enqueue_event(
        self, event_type: str, payload: Mapping[str, Any], tenant: str | None = None
    ) -> list[str]:
        """``enqueue`` to every target that takes ``event_type`` and allows ``tenant`` (the owner of
        what the event is about; None = no tenant: every target that takes the event)."""
        ids = []
        for name, target in self.targets.items():
            if target.takes(event_type) and target.allows(tenant, admin=tenant is None):
                delivery_id = await self.enqueue(name, event_type, payload)
                if delivery_id is not None:
                    ids.append(delivery_id)
        return ids

    # --- lifecycle ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for due deliveries now; callable from any thread or event loop."""
        loop = self._loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is None or current is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def start(self) -> None:
        global _active
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.settings.webhook_timeout_s),
            follow_redirects=False,  # a redirect must not carry a signed body to another address
            transport=self._transport,
            limits=httpx.Limits(max_connections=self.settings.webhook_concurrency),
            headers={"User-Agent": "emotion-server-webhooks/1"},
        )
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")
        _active = self

    async def stop(self) -> None:
        """Stop sending. An attempt cut off here was not recorded: it is sent again after a restart
        (receivers de-duplicate on ``X-Emotion-Delivery``)."""
        global _active
        if _active is self:
            _active = None
        tasks = [t for t in (self._task, *self._in_flight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- sending -----------------------------------------------------------------------------

    async def _run(self) -> None:
        concurrency = self.settings.webhook_concurrency
        while True:
            try:
                self._wake.clear()
                free = concurrency - len(self._in_flight)
                if free > 0:
                    due = await self.store.due_deliveries(time.time(), free + len(self._in_flight))
                    for d in due:
                        if d.id not in self._in_flight and len(self._in_flight) < concurrency:
                            self._in_flight[d.id] = asyncio.create_task(
                                self._deliver(d), name=f"webhook-{d.id}"
                            )
                wait = await self._next_wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store failed: keep the dispatcher alive, try again later
                log.warning("webhook dispatcher: %r", exc)
                wait = 5.0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def _next_wait(self) -> float:
        if len(self._in_flight) >= self.settings.webhook_concurrency:
            return 30.0  # a finishing delivery wakes us
        due = await self.store.due_deliveries(time.time(), len(self._in_flight) + 1)
        if any(d.id not in self._in_flight for d in due):
            return 0.0
        next_at = await self.store.next_due_at(exclude=tuple(self._in_flight))
        if next_at is None:
            return 30.0
        return min(30.0, max(0.0, next_at - time.time()))

    async def _deliver(self, d: Delivery) -> None:
        try:
            await self._attempt(d)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # recording failed (store closed?): retried from the store later
            log.warning("webhook delivery %s: %r", d.id, exc)
        finally:
            self._in_flight.pop(d.id, None)
            self.wake()

    async def _attempt(self, d: Delivery) -> None:
        s = self.settings
        attempt = d.attempts + 1
        target = self.targets.get(d.target)
        status_code: int | None = None
        error: str | None = None
        if target is None:
            error = "the target is no longer configured"
            attempt = s.webhook_max_attempts  # nothing to retry against
        else:
            body = d.body.encode()
            headers = {
                "Content-Type": "application/json",
                "X-Emotion-Event": d.event,
                "X-Emotion-Delivery": d.id,
                "X-Emotion-Attempt": str(attempt),
                SIGNATURE_HEADER: signature(target.secret.get_secret_value(), body, int(time.time())),
            }
            assert self._client is not None  # started
            try:
                async with self._client.stream("POST", target.url, content=body, headers=headers) as r:
                    status_code = r.status_code  # the answer's body is not read
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
        delivered = status_code is not None and 200 <= status_code < 300
        if not delivered and error is None:
            error = f"HTTP {status_code}"
        retry = not delivered and attempt < s.webhook_max_attempts
        next_at = (
            time.time() + backoff_s(attempt, s.webhook_backoff_s, s.webhook_backoff_max_s) if retry else None
        )
        await self.store.record_attempt(
            d.id,
            delivered=delivered,
            status_code=status_code,
            error=None if delivered else error,
            next_attempt_at=next_at,
        )
        outcome = "delivered" if delivered else ("retry" if retry else "failed")
        ATTEMPTS.labels(outcome=outcome).inc()
        level = logging.INFO if delivered else logging.WARNING
        log.log(
            level,
            "webhook %s %s to %s: attempt %d %s (%s)",
            d.event,
            d.id,
            d.target,
            attempt,
            outcome,
            error or status_code,
        )


def active() -> WebhookDispatcher | None:
    """The dispatcher of the running server (None before start-up or after shutdown)."""
    return _active


async def enqueue(target_name: str, event_type: str, payload: Mapping[str, Any]) -> str | None:
    """Queue ``event_type`` (e.g. ``session.ended``) with ``payload`` as ``data`` for the configured
    target ``target_name`` on the running server; returns the delivery id (None when that target
    does not take this event). ``UnknownWebhookError`` for an unknown name; ``RuntimeError`` when
    no server is running."""
    dispatcher = _active
    if dispatcher is None:
        raise RuntimeError("webhooks are not running (no server started)")
    return await dispatcher.enqueue(target_name, event_type, payload)
