"""Stream leases (``app.store.lease``): one live stream per session, a stale lease is taken over.

The lease rules run against both backends (in-process ``LocalLeases``, ``RedisLeases`` on a real
redis-server), then through ``WS /v1/stream`` with a stub service (no models: start/stop only) over
the SQLite store (process leases) and the Redis store: a second stream on a live session is closed
4009 ``session_busy`` with ``retry_after_s``; a lease left by a dead owner is taken over once it
expires; ``ready`` carries the session's resume point; a stream whose lease was taken over is
closed 4009 and leaves the session open for its successor.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.main import create_app
from app.settings import Settings
from app.store.lease import LocalLeases, RedisLeases, leases_of, new_owner
from app.store.redis import RedisStore
from app.store.sqlite import SQLiteStore
from tests.stream_support import redis_server
from tests.test_api_tenants import Service

START = {"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1}
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    with redis_server() as url:
        yield url


def sid() -> str:
    return uuid.uuid4().hex


# --- the lease rules, on both backends --------------------------------------------------------------


@pytest.fixture(params=["local", "redis"])
def leases(request):
    if request.param == "local":
        yield LocalLeases()
        return
    import redis.asyncio as aioredis

    url = request.getfixturevalue("redis_url")
    prefix = f"lease{next(_prefixes)}:"
    yield lambda: (aioredis.Redis.from_url(url, decode_responses=True), prefix)


def _make(leases):
    """(leases, closer) in the running loop (a Redis client belongs to its loop)."""
    if isinstance(leases, LocalLeases):
        return leases, None
    client, prefix = leases()
    return RedisLeases(client, lambda s: f"{prefix}session{{{s}}}:lease"), client


def test_second_owner_refused_then_takes_over_a_stale_lease(leases):
    async def body():
        lz, client = _make(leases)
        s, a, b = sid(), new_owner(), new_owner()
        assert a != b and a.rsplit(":", 1)[0] == b.rsplit(":", 1)[0]  # same process, distinct streams
        assert (await lz.acquire(s, a, 0.4)).acquired
        refused = await lz.acquire(s, b, 0.4)
        assert not refused.acquired and refused.holder == a and 0 < refused.expires_in_s <= 0.4
        assert await lz.renew(s, a, 0.4) is True
        assert await lz.renew(s, b, 0.4) is False  # not the holder
        assert await lz.release(s, b) is False  # compare-and-delete: b cannot free a's lease
        assert not (await lz.acquire(s, b, 0.4)).acquired
        await asyncio.sleep(0.5)  # a stops renewing (its replica died): the lease goes stale
        assert (await lz.acquire(s, b, 5.0)).acquired  # taken over
        assert await lz.renew(s, a, 0.4) is False  # a finds it lost
        assert await lz.release(s, a) is False  # and cannot delete its successor's lease
        refused = await lz.acquire(s, a, 0.4)
        assert not refused.acquired and refused.holder == b and refused.expires_in_s > 4.0
        assert await lz.release(s, b) is True
        assert (await lz.acquire(s, a, 0.4)).acquired  # released: free at once
        if client is not None:
            await client.aclose()

    asyncio.run(body())


def test_a_slow_owner_whose_lease_nobody_took_keeps_it(leases):
    async def body():
        lz, client = _make(leases)
        s, a, b = sid(), new_owner(), new_owner()
        assert (await lz.acquire(s, a, 0.2)).acquired
        await asyncio.sleep(0.3)  # expired, but nobody else asked
        assert await lz.renew(s, a, 2.0) is True
        assert not (await lz.acquire(s, b, 2.0)).acquired
        if client is not None:
            await client.aclose()

    asyncio.run(body())


# --- through WS /v1/stream ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """(store factory for the app, store factory for seeding from another loop, kind)."""
    if request.param == "sqlite":
        path = tmp_path / "sessions.db"
        return (lambda: SQLiteStore(path, poll_interval_s=0.2)), (lambda: SQLiteStore(path)), "sqlite"
    url = request.getfixturevalue("redis_url")
    prefix = f"ws{next(_prefixes)}:"
    return (lambda: RedisStore(url, prefix=prefix)), (lambda: RedisStore(url, prefix=prefix)), "redis"


def client_of(store, **overrides) -> TestClient:
    settings = Settings(sqlite_path="unused.db", **overrides)
    return TestClient(create_app(settings, Service(), store=store))


def first_and_close(ws) -> tuple[dict, int, dict]:
    """The first message of a refused stream, its close code and JSON close reason."""
    first = ws.receive_json()
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    return first, closed.value.code, json.loads(closed.value.reason)


def seed(store_factory, coro_fn):
    async def body():
        store = store_factory()
        try:
            return await coro_fn(store)
        finally:
            await store.close()

    return asyncio.run(body())


def test_second_stream_on_a_live_session_is_refused_4009(backend):
    make, _, _ = backend
    s = sid()
    with client_of(make()) as c:
        with c.websocket_connect("/v1/stream") as first:
            first.send_text(json.dumps({**START, "session_id": s}))
            assert first.receive_json()["type"] == "ready"
            with c.websocket_connect("/v1/stream") as second:
                second.send_text(json.dumps({**START, "session_id": s}))
                msg, code, reason = first_and_close(second)
            assert code == 4009 and reason["error"] == "session_busy"
            assert msg["type"] == "error" and msg["error"] == "session_busy" and msg["close_code"] == 4009
            assert 0 < msg["retry_after_s"] <= 10.0  # the holder's lease runs out by then at most
            first.send_text(json.dumps({"type": "stop"}))
            assert first.receive_json()["type"] == "end"
        # the first stream released its lease when it ended: the session can be streamed again
        with c.websocket_connect("/v1/stream") as again:
            again.send_text(json.dumps({**START, "session_id": s}))
            assert again.receive_json()["type"] == "ready"
            again.send_text(json.dumps({"type": "stop"}))
            assert again.receive_json()["type"] == "end"


def test_stale_lease_of_a_dead_replica_is_taken_over(backend):
    make, seed_store, kind = backend
    s = sid()
    store = make()
    if kind == "redis":  # a replica that died while streaming: its lease is nobody's to renew
        seed(seed_store, _hold(s, 0.5))
    else:
        asyncio.run(_hold(s, 0.5)(store))
    with client_of(store) as c:
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({**START, "session_id": s}))
            msg, code, _ = first_and_close(ws)
        assert code == 4009 and 0 < msg["retry_after_s"] <= 0.5
        time.sleep(msg["retry_after_s"] + 0.1)  # the dead owner's lease has expired by then
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({**START, "session_id": s}))
            ready = ws.receive_json()
            assert ready["type"] == "ready", ready
            ws.send_text(json.dumps({"type": "stop"}))
            assert ws.receive_json()["type"] == "end"


def _hold(session_id: str, ttl_s: float, owner: str = "dead-host:1:abc"):
    async def hold(store):
        assert (await leases_of(store).acquire(session_id, owner, ttl_s)).acquired

    return hold


def result(start: float, end: float) -> dict:
    return {"channel": 0, "start": start, "end": end, "text": "hi", "words": [], "emotion": None}


def test_ready_reports_the_resume_point_and_last_seq(backend):
    make, seed_store, _ = backend
    s = sid()

    async def earlier_connection(store):
        await store.open_session(s)
        await store.append_result(s, result(0.5, 3.0))
        await store.append_result(s, result(3.6, 7.25))
        await store.close_session(s)

    seed(seed_store, earlier_connection)
    with client_of(make()) as c:
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({**START, "session_id": s}))
            ready = ws.receive_json()
            ws.send_text(json.dumps({"type": "stop"}))
            assert ws.receive_json()["type"] == "end"
        assert ready["resume_offset_s"] == 7.25 and ready["last_seq"] == 2
        # a live source that lost audio tells where its next frame is: later than the resume point
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({**START, "session_id": s, "audio_offset_s": 9.5}))
            assert ws.receive_json()["resume_offset_s"] == 9.5
            ws.send_text(json.dumps({"type": "stop"}))
            assert ws.receive_json()["type"] == "end"  # the lease is free once `end` arrives
        # never before the resume point: stored results are not placed twice on the timeline
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({**START, "session_id": s, "audio_offset_s": 1.0}))
            assert ws.receive_json()["resume_offset_s"] == 7.25
            ws.send_text(json.dumps({"type": "stop"}))
        # a new session starts at 0
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps(START))
            ready = ws.receive_json()
            assert ready["resume_offset_s"] == 0.0 and ready["last_seq"] == 0
            ws.send_text(json.dumps({"type": "stop"}))


def test_stream_whose_lease_was_taken_over_is_closed_and_leaves_the_session_open(backend):
    make, seed_store, kind = backend
    s = sid()
    store = make()
    with client_of(store, stream_lease_ttl_s=0.6) as c:  # renewed every 0.2 s
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({**START, "session_id": s}))
            assert ws.receive_json()["type"] == "ready"
            # another stream takes the lease over (as after a partition longer than the TTL)
            if kind == "redis":
                seed(seed_store, _steal(s))
            else:
                leases = leases_of(store)
                assert isinstance(leases, LocalLeases)
                leases._held[s] = ("other-host:2:def", time.monotonic() + 30.0)
            t0 = time.monotonic()
            msg, code, reason = first_and_close(ws)
            closed_after = time.monotonic() - t0
        assert code == 4009 and reason["error"] == "session_busy" and msg["error"] == "session_busy"
        assert closed_after < 3.0
        view = c.get(f"/v1/sessions/{s}").json()
        assert view["state"] == "active"  # the successor's session was not ended under it
    if kind == "sqlite":
        leases_of(store)._held.pop(s, None)  # type: ignore[attr-defined]


def _steal(session_id: str):
    async def steal(store):
        await store._r.set(f"{store.prefix}session{{{session_id}}}:lease", "other-host:2:def", px=30_000)

    return steal
