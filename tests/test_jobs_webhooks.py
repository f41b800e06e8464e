"""Webhook signatures, retries with growing delays and durability (app/jobs/webhooks.py), against a
real HTTP receiver on loopback; no models."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import pytest
from pydantic import ValidationError

from app.jobs.store import DELIVERED, FAILED, PENDING, JobStore
from app.jobs.webhooks import UnknownWebhookError, WebhookDispatcher, backoff_s, signature, verify
from app.settings import Settings
from tests.jobs_support import SECRET, Receiver, wait_for
from tests.stream_support import free_port


def settings_for(tmp_path, url: str, **overrides) -> Settings:
    values = dict(
        sqlite_path=tmp_path / "sessions.db",
        webhooks={
            "hook": {"url": url, "secret": SECRET},
            "sessions-only": {"url": url, "secret": SECRET, "events": ["session.ended"]},
        },
        webhook_backoff_s=0.3,
        webhook_timeout_s=2.0,
    )
    values.update(overrides)
    return Settings(**values)


async def _delivery_until(
    store: JobStore, delivery_id: str, states: tuple[str, ...], timeout_s: float = 20.0
):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = await store.get_delivery(delivery_id)
        if d is not None and d.status in states:
            return d
        await asyncio.sleep(0.05)
    raise TimeoutError(f"delivery {delivery_id} never reached {states}")


def test_signature_is_hmac_sha256_over_timestamp_and_body():
    body = b'{"id":"dlv_1","event":"job.done"}'
    header = signature(SECRET, body, 1_767_312_000)
    t, v1 = header.split(",")
    assert t == "t=1767312000"
    expected = hmac.new(SECRET.encode(), b"1767312000." + body, hashlib.sha256).hexdigest()
    assert v1 == f"v1={expected}"
    now = 1_767_312_000 + 10
    assert verify(SECRET, body, header, now=now)
    assert not verify("another-secret-0123456789", body, header, now=now)
    assert not verify(SECRET, body + b" ", header, now=now)  # tampered body
    assert not verify(SECRET, body, header, now=now + 3600)  # replayed an hour later
    assert not verify(SECRET, body, None) and not verify(SECRET, body, "t=x,v1=00")
    rotated = f"{header},v1={'0' * 64}"  # several v1 entries (secret rotation): any one may match
    assert verify(SECRET, body, rotated, now=now)


def test_backoff_doubles_with_bounded_jitter():
    low = [backoff_s(n, 2.0, 100.0, rand=lambda: 0.0) for n in (1, 2, 3, 4)]
    high = [backoff_s(n, 2.0, 100.0, rand=lambda: 1.0) for n in (1, 2, 3, 4)]
    assert low == [2.0, 4.0, 8.0, 16.0]
    assert high == [2.5, 5.0, 10.0, 20.0]
    assert all(
        h < nxt for h, nxt in zip(high[:-1], low[1:], strict=True)
    )  # jitter never makes a delay shorter than the last
    assert backoff_s(20, 2.0, 100.0, rand=lambda: 0.0) == 100.0  # capped


def test_targets_come_from_settings_and_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "EMOTION_WEBHOOKS",
        json.dumps({"crm": {"url": "https://crm.example/hooks", "secret": SECRET, "tenants": ["alice"]}}),
    )
    s = Settings()
    assert s.webhooks["crm"].url == "https://crm.example/hooks"
    assert s.webhooks["crm"].secret.get_secret_value() == SECRET
    assert SECRET not in s.model_dump_json()  # masked wherever settings are printed
    for bad in (
        {"x": {"url": "file:///etc/passwd", "secret": SECRET}},
        {"x": {"url": "https://a.example/h", "secret": "short"}},
        {"x": {"url": "https://a.example/h", "secret": SECRET, "events": ["job.exploded"]}},
        {"bad name!": {"url": "https://a.example/h", "secret": SECRET}},
    ):
        with pytest.raises(ValidationError):
            Settings(webhooks=bad)
    dispatcher = WebhookDispatcher(s, JobStore(tmp_path / "jobs"))
    assert dispatcher.target_for("crm", "job.done", tenant="alice", admin=False).url.startswith("https://")
    for name, tenant in (("crm", "bob"), ("nope", "alice")):
        with pytest.raises(UnknownWebhookError):
            dispatcher.target_for(name, "job.done", tenant=tenant, admin=False)


def test_a_failing_receiver_gets_retries_with_growing_delays_then_the_signed_body(tmp_path):
    receiver = Receiver(statuses=[500, 500])
    settings = settings_for(tmp_path, receiver.url)

    async def body():
        store = JobStore(tmp_path / "jobs")
        dispatcher = WebhookDispatcher(settings, store)
        await dispatcher.start()
        try:
            with pytest.raises(UnknownWebhookError):
                await dispatcher.enqueue("nope", "job.done", {})
            assert await dispatcher.enqueue("sessions-only", "job.done", {}) is None  # not its event
            delivery_id = await dispatcher.enqueue("hook", "session.ended", {"session_id": "s1"})
            assert delivery_id is not None
            return await _delivery_until(store, delivery_id, (DELIVERED, FAILED))
        finally:
            await dispatcher.stop()
            await store.close()

    try:
        d = asyncio.run(body())
    finally:
        receiver.close()
    assert d.status == DELIVERED and d.attempts == 3 and d.last_status_code == 200
    hits = receiver.hits
    assert len(hits) == 3
    assert [h.headers["X-Emotion-Attempt"] for h in hits] == ["1", "2", "3"]
    assert {h.headers["X-Emotion-Delivery"] for h in hits} == {d.id}
    assert {h.body for h in hits} == {hits[0].body}  # the same bytes every time
    for h in hits:
        assert h.headers["X-Emotion-Event"] == "session.ended"
        assert verify(SECRET, h.body, h.headers["X-Emotion-Signature"])
    payload = json.loads(hits[-1].body)
    assert payload["id"] == d.id and payload["event"] == "session.ended"
    assert payload["data"] == {"session_id": "s1"} and payload["created_at"].endswith("Z")
    first, second = hits[1].at - hits[0].at, hits[2].at - hits[1].at
    assert 0.3 <= first < second  # 0.3-0.375 s, then 0.6-0.75 s
    assert second >= 0.6


def test_a_delivery_fails_after_max_attempts(tmp_path):
    receiver = Receiver(statuses=[503] * 10)
    settings = settings_for(tmp_path, receiver.url, webhook_max_attempts=2, webhook_backoff_s=0.1)

    async def body():
        store = JobStore(tmp_path / "jobs")
        dispatcher = WebhookDispatcher(settings, store)
        await dispatcher.start()
        try:
            delivery_id = await dispatcher.enqueue("hook", "job.failed", {"job": {}})
            assert delivery_id is not None
            return await _delivery_until(store, delivery_id, (DELIVERED, FAILED))
        finally:
            await dispatcher.stop()
            await store.close()

    try:
        d = asyncio.run(body())
    finally:
        receiver.close()
    assert d.status == FAILED and d.attempts == 2 and d.last_status_code == 503
    assert d.public()["next_attempt_at"] is None and len(receiver.hits) == 2


def test_a_pending_delivery_survives_a_restart(tmp_path):
    port = free_port()  # nothing listens there yet: the first attempt is refused
    url = f"http://127.0.0.1:{port}/hook"
    settings = settings_for(tmp_path, url, webhook_backoff_s=1.0)

    async def first_life() -> str:
        store = JobStore(tmp_path / "jobs")
        dispatcher = WebhookDispatcher(settings, store)
        await dispatcher.start()
        delivery_id = await dispatcher.enqueue("hook", "job.done", {"job": {"job_id": "j1"}})
        assert delivery_id is not None
        deadline = time.monotonic() + 10
        while (d := await store.get_delivery(delivery_id)) is not None and d.attempts < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await dispatcher.stop()
        await store.close()
        assert d is not None and d.status == PENDING and d.last_status_code is None and d.last_error
        return delivery_id

    delivery_id = asyncio.run(first_life())
    receiver = Receiver(port=port)

    async def second_life():
        store = JobStore(tmp_path / "jobs")
        dispatcher = WebhookDispatcher(settings, store)
        await dispatcher.start()
        try:
            return await _delivery_until(store, delivery_id, (DELIVERED, FAILED))
        finally:
            await dispatcher.stop()
            await store.close()

    try:
        d = asyncio.run(second_life())
        wait_for(lambda: receiver.hits)
    finally:
        receiver.close()
    assert d.status == DELIVERED and d.attempts == 2
    assert [h.headers["X-Emotion-Attempt"] for h in receiver.hits] == ["2"]
    assert receiver.hits[0].headers["X-Emotion-Delivery"] == delivery_id
    assert verify(SECRET, receiver.hits[0].body, receiver.hits[0].headers["X-Emotion-Signature"])
