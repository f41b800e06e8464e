"""Contract tests of the session store, run unchanged against every backend.

SQLite runs on a temporary file; Redis against a real ``redis-server`` started on a free loopback
port (skipped only when the binary is absent: ``make test`` installs it through ``system-deps``).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
import uuid

import pytest

from app.store import SessionNotFound, open_store
from app.store.redis import RedisStore
from app.store.sqlite import SQLiteStore
from tests.stream_support import redis_server

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    with redis_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """A factory of store instances that all see the same data (like replicas or a restart)."""
    if request.param == "sqlite":
        path = tmp_path / "sessions.db"
        return lambda: SQLiteStore(path, poll_interval_s=0.2)
    url = request.getfixturevalue("redis_url")
    prefix = f"t{next(_prefixes)}:"  # isolates tests sharing the server
    return lambda: RedisStore(url, prefix=prefix)


def run(coro):
    return asyncio.run(coro)


def result(label="happy", channel=0, start=0.0, end=1.0, text="hi"):
    probs = {"angry": 0.1, "happy": 0.1, "neutral": 0.1, "sad": 0.1}
    probs[label] = 0.7
    return {
        "channel": channel,
        "start": start,
        "end": end,
        "text": text,
        "words": [{"word": text, "start": start, "end": end, "confidence": 0.9}],
        "emotion": {"label": label, "probabilities": probs, "per_model": {}},
    }


def sid() -> str:
    return uuid.uuid4().hex


def test_open_get_reopen(make_store):
    async def body():
        store = make_store()
        s = sid()
        assert await store.get_session(s) is None
        opened = await store.open_session(s, {"agent": "a1"}, source="rest")
        assert opened["id"] == s and opened["state"] == "active" and opened["source"] == "rest"
        assert opened["metadata"] == {"agent": "a1"}
        assert opened["result_count"] == 0 and opened["last_result"] is None
        assert opened["emotion"] == {"n": 0, "label": None, "counts": {}, "mean_probabilities": {}}
        await store.close_session(s)
        ended = await store.get_session(s)
        assert ended["state"] == "ended" and ended["ended_at"] is not None
        again = await store.open_session(s, {"call": 7}, source="stream")
        assert again["state"] == "active" and again["ended_at"] is None
        assert again["created_at"] == opened["created_at"] and again["source"] == "rest"
        assert again["metadata"] == {"agent": "a1", "call": 7}
        with pytest.raises(ValueError):
            await store.open_session(sid(), source="carrier-pigeon")
        await store.close()

    run(body())


def test_append_sequence_and_aggregates(make_store):
    async def body():
        store = make_store()
        s = sid()
        await store.open_session(s)
        seqs = [
            await store.append_result(s, result("happy", 0, 0.0, 1.0)),
            await store.append_result(s, result("sad", 1, 0.5, 2.5)),
            await store.append_result(s, result("happy", 0, 3.0, 4.0, text="bye")),
        ]
        assert seqs == [1, 2, 3]
        got = await store.results(s)
        assert [r["seq"] for r in got] == [1, 2, 3]
        assert all(r["session_id"] == s for r in got)
        assert got[1]["channel"] == 1 and got[1]["text"] == "hi" and got[1]["words"][0]["confidence"] == 0.9
        assert [r["seq"] for r in await store.results(s, after=1)] == [2, 3]
        assert [r["seq"] for r in await store.results(s, after=0, limit=2)] == [1, 2]
        assert await store.results(s, after=3) == []
        view = await store.get_session(s)
        assert view["result_count"] == 3 and view["last_seq"] == 3
        assert view["channels"] == [0, 1]
        assert view["audio_duration_s"] == 4.0
        assert view["emotion"]["n"] == 3 and view["emotion"]["counts"] == {"happy": 2, "sad": 1}
        mean = view["emotion"]["mean_probabilities"]
        assert mean["happy"] == pytest.approx((0.7 + 0.1 + 0.7) / 3)
        assert sum(mean.values()) == pytest.approx(1.0)
        assert view["emotion"]["label"] == "happy"
        assert view["last_result"]["seq"] == 3 and view["last_result"]["text"] == "bye"
        with pytest.raises(SessionNotFound):
            await store.append_result(sid(), result())
        # A result without emotion counts as a result but not in the distribution.
        no_emotion = {"channel": 0, "start": 5.0, "end": 6.0, "text": "", "words": [], "emotion": None}
        assert await store.append_result(s, no_emotion) == 4
        view = await store.get_session(s)
        assert view["result_count"] == 4 and view["emotion"]["n"] == 3
        await store.close()

    run(body())


def test_concurrent_appends_are_unique_and_gap_free(make_store):
    async def body():
        a, b = make_store(), make_store()  # two "replicas"
        s = sid()
        await a.open_session(s)
        seqs = await asyncio.gather(
            *[(a if i % 2 else b).append_result(s, result(text=str(i))) for i in range(40)]
        )
        assert sorted(seqs) == list(range(1, 41))
        stored = await a.results(s)
        assert [r["seq"] for r in stored] == list(range(1, 41))
        assert sorted(int(r["text"]) for r in stored) == list(range(40))
        await a.close()
        await b.close()

    run(body())


def test_list_filters_and_order(make_store):
    async def body():
        store = make_store()
        ids = [sid() for _ in range(4)]
        for s in ids:
            await store.open_session(s)
            await asyncio.sleep(0.01)  # distinct updated_at
        await store.close_session(ids[0])
        await store.append_result(ids[1], result())  # newest update
        listed = await store.list_sessions()
        mine = [x["id"] for x in listed if x["id"] in ids]
        assert mine[0] == ids[1] and set(mine) == set(ids)
        assert {x["id"] for x in await store.list_sessions(state="ended")} & set(ids) == {ids[0]}
        active = {x["id"] for x in await store.list_sessions(state="active")}
        assert set(ids[1:]) <= active and ids[0] not in active
        assert len(await store.list_sessions(limit=2)) == 2
        with pytest.raises(ValueError):
            await store.list_sessions(state="paused")
        await store.close()

    run(body())


def test_long_poll_wakes_on_append_from_another_instance(make_store):
    async def body():
        reader, writer = make_store(), make_store()
        s = sid()
        await writer.open_session(s)

        async def append_later():
            await asyncio.sleep(0.3)
            await writer.append_result(s, result())

        t0 = time.monotonic()
        got, _ = await asyncio.gather(reader.results(s, after=0, wait_s=10.0), append_later())
        waited = time.monotonic() - t0
        assert [r["seq"] for r in got] == [1]
        assert waited < 2.0  # far below wait_s
        # Same instance: woken in-process, promptly.
        t0 = time.monotonic()
        got, _ = await asyncio.gather(writer.results(s, after=1, wait_s=10.0), append_later())
        assert [r["seq"] for r in got] == [2] and time.monotonic() - t0 < 1.5
        await reader.close()
        await writer.close()

    run(body())


def test_long_poll_times_out_and_returns_on_end_or_delete(make_store):
    async def body():
        store = make_store()
        s = sid()
        await store.open_session(s)
        t0 = time.monotonic()
        assert await store.results(s, after=0, wait_s=0.4) == []
        assert 0.35 <= time.monotonic() - t0 < 2.0

        async def later(coro):
            await asyncio.sleep(0.2)
            await coro

        t0 = time.monotonic()
        got, _ = await asyncio.gather(store.results(s, wait_s=10.0), later(store.close_session(s)))
        assert got == [] and time.monotonic() - t0 < 1.5
        # Ended: no wait at all.
        t0 = time.monotonic()
        assert await store.results(s, wait_s=10.0) == [] and time.monotonic() - t0 < 0.5

        s2 = sid()
        await store.open_session(s2)
        t0 = time.monotonic()
        got, _ = await asyncio.gather(store.results(s2, wait_s=10.0), later(store.delete_session(s2)))
        assert got == [] and time.monotonic() - t0 < 1.5
        # Unknown sessions answer at once.
        assert await store.results(sid(), wait_s=10.0) == []
        await store.close()

    run(body())


def test_delete(make_store):
    async def body():
        store = make_store()
        s = sid()
        await store.open_session(s)
        await store.append_result(s, result())
        assert await store.delete_session(s) is True
        assert await store.get_session(s) is None
        assert await store.results(s) == []
        assert s not in {x["id"] for x in await store.list_sessions()}
        assert await store.delete_session(s) is False
        # The id can be used again from scratch.
        await store.open_session(s)
        assert await store.append_result(s, result()) == 1
        await store.close()

    run(body())


def test_persists_across_reopen(make_store):
    async def body():
        first = make_store()
        s = sid()
        await first.open_session(s, {"k": "v"})
        await first.append_result(s, result("angry"))
        await first.close_session(s)
        await first.close()

        second = make_store()  # a restart: new instance, same file / same server
        view = await second.get_session(s)
        assert view["state"] == "ended" and view["metadata"] == {"k": "v"}
        assert view["emotion"]["counts"] == {"angry": 1}
        assert [r["seq"] for r in await second.results(s)] == [1]
        await second.open_session(s)
        assert await second.append_result(s, result()) == 2  # numbering continues
        await second.close()

    run(body())


def test_open_store_picks_backend(tmp_path):
    from app.settings import Settings

    store = open_store(Settings(store="sqlite", sqlite_path=tmp_path / "x.db"))
    assert isinstance(store, SQLiteStore)
    assert isinstance(open_store(Settings(store="redis", redis_url="redis://127.0.0.1:1/0")), RedisStore)
    with pytest.raises(ValueError):
        open_store(Settings(store="mongo"))
    run(store.close())


def test_sqlite_uses_wal(tmp_path):
    import sqlite3

    async def body():
        store = SQLiteStore(tmp_path / "w.db")
        await store.open_session("x")
        await store.close()

    run(body())
    mode = sqlite3.connect(tmp_path / "w.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


# --- production hardening: key aliasing, long polls vs. the connection pools ---------------------


def test_session_ids_with_colons_do_not_alias(make_store):
    """`victim:results` is a valid id of its own: it must not name `victim`'s results (Redis keys)."""

    async def body():
        store = make_store()
        victim = sid()
        await store.open_session(victim)
        await store.append_result(victim, result("sad"))
        assert await store.delete_session(f"{victim}:results") is False
        assert await store.delete_session(f"{victim}:events") is False
        assert [r["seq"] for r in await store.results(victim)] == [1]
        other = await store.open_session(f"{victim}:results")
        assert other["id"] == f"{victim}:results" and other["result_count"] == 0
        assert await store.append_result(f"{victim}:results", result("angry")) == 1
        assert await store.delete_session(f"{victim}:results") is True
        view = await store.get_session(victim)
        assert view["result_count"] == 1 and view["emotion"]["counts"] == {"sad": 1}
        assert [r["emotion"]["label"] for r in await store.results(victim)] == ["sad"]
        await store.close()

    run(body())


def test_redis_long_poll_outlasts_the_socket_timeout(redis_url):
    """A wait longer than redis-py's 5 s socket timeout must not fail (it did at 5.0 s)."""

    async def body():
        store = RedisStore(redis_url, prefix=f"t{next(_prefixes)}:")
        s = sid()
        await store.open_session(s)

        async def late_append():
            await asyncio.sleep(5.4)
            await store.append_result(s, result())

        t0 = time.monotonic()
        writer = asyncio.create_task(late_append())
        got = await store.results(s, after=0, wait_s=8.0)
        await writer
        assert [r["seq"] for r in got] == [1]
        assert 5.3 < time.monotonic() - t0 < 7.5
        await store.close()

    run(body())


def test_redis_long_polls_do_not_starve_writes(redis_url):
    """150 blocked long polls (more than the old shared pool of 100) must leave room for writes."""

    async def body():
        store = RedisStore(redis_url, prefix=f"t{next(_prefixes)}:")
        s = sid()
        await store.open_session(s)
        polls = [asyncio.create_task(store.results(s, after=0, wait_s=5.0)) for _ in range(150)]
        await asyncio.sleep(0.5)  # every poll is blocked in XREAD now
        assert await store.append_result(s, result()) == 1
        assert (await store.get_session(s))["result_count"] == 1
        outcomes = await asyncio.gather(*polls)
        assert all([r["seq"] for r in got] == [1] for got in outcomes)
        await store.close()

    run(body())


def test_redis_long_polls_beyond_their_pool_are_503(redis_url):
    from app.errors import status_and_code
    from app.store import StoreBusy

    async def body():
        store = RedisStore(redis_url, prefix=f"t{next(_prefixes)}:", max_long_polls=2)
        s = sid()
        await store.open_session(s)
        polls = [asyncio.create_task(store.results(s, wait_s=3.0)) for _ in range(2)]
        await asyncio.sleep(0.3)
        with pytest.raises(StoreBusy) as busy:
            await store.results(s, wait_s=3.0)
        assert status_and_code(busy.value) == (503, "store_busy") and busy.value.retry_after
        assert await store.results(s) == []  # non-blocking reads are not limited
        assert await store.append_result(s, result()) == 1  # and writes still go through
        assert [[r["seq"] for r in got] for got in await asyncio.gather(*polls)] == [[1], [1]]
        await store.close()

    run(body())


def test_redis_adopts_sessions_of_the_old_key_layout(redis_url):
    import json

    import redis.asyncio as aioredis

    async def body():
        prefix = f"t{next(_prefixes)}:"
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        s = sid()
        old = f"{prefix}session:{s}"
        body_json = json.dumps({k: v for k, v in result("angry").items()})
        await raw.hset(
            old,
            mapping={
                "id": s, "state": "active", "source": "rest", "created_at": "1.0", "updated_at": "2.0",
                "metadata": '{"k": 1}', "last_seq": "1", "result_count": "1", "audio_end": "1.0",
                "emo_n": "1", "count:angry": "1", "psum:angry": "0.7", "last_result": body_json, "ch:0": "1",
            },
        )  # fmt: skip
        await raw.xadd(old + ":results", {"r": body_json}, id="1-0")
        await raw.zadd(f"{prefix}sessions", {s: 2.0})
        await raw.aclose()

        store = RedisStore(redis_url, prefix=prefix)
        assert [x["id"] for x in await store.list_sessions()] == [s]
        view = await store.get_session(s)
        assert view["metadata"] == {"k": 1} and view["emotion"]["counts"] == {"angry": 1}
        assert [r["seq"] for r in await store.results(s)] == [1]
        assert await store.append_result(s, result()) == 2
        await store.close_session(s)
        assert (await store.get_session(s))["state"] == "ended"
        await store.close()

    run(body())


def test_redis_pool_exhausted_is_503_store_busy_with_retry_after(redis_url):
    """A command that waits the pool's whole timeout for a connection: 503 store_busy, not a 500."""
    from app.errors import status_and_code
    from app.store import StoreBusy
    from app.store.redis import StorePoolExhausted

    async def body():
        store = RedisStore(redis_url, prefix=f"t{next(_prefixes)}:", max_connections=1, pool_timeout_s=0.3)
        s = sid()
        await store.open_session(s)
        held = await store._r.connection_pool.get_connection()  # every command connection is busy
        t0 = time.monotonic()
        with pytest.raises(StorePoolExhausted) as busy:
            await store.get_session(s)
        assert 0.25 < time.monotonic() - t0 < 2.0
        assert isinstance(busy.value, StoreBusy)
        assert status_and_code(busy.value) == (503, "store_busy") and busy.value.retry_after
        with pytest.raises(StoreBusy):  # scripts and pipelines too
            await store.append_result(s, result())
        await store._r.connection_pool.release(held)
        assert (await store.get_session(s))["result_count"] == 0  # served again once one is free
        await store.close()

    run(body())


def test_redis_pool_exhausted_reaches_the_client_as_503(redis_url):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from tests.test_health import StubService

    store = RedisStore(redis_url, prefix=f"t{next(_prefixes)}:", max_connections=1, pool_timeout_s=0.3)
    with TestClient(create_app(Settings(), StubService(), store=store)) as client:
        assert client.get("/v1/sessions").status_code == 200
        held = client.portal.call(store._r.connection_pool.get_connection)  # in the app's loop
        r = client.get("/v1/sessions")
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "store_busy" and "busy" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
        client.portal.call(store._r.connection_pool.release, held)
        assert client.get("/v1/sessions").status_code == 200


def test_redis_tenant_listing_reads_only_its_own_index(redis_url):
    """1 session of tenant `small` among 300 of `big`: its listing reads 1 hash, not the others."""
    import redis.asyncio as aioredis

    async def hgetall_calls(raw) -> int:
        stats = await raw.info("commandstats")
        return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))

    async def body():
        prefix = f"t{next(_prefixes)}:"
        store = RedisStore(redis_url, prefix=prefix)
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        mine = sid()
        await store.open_session(mine, tenant="small")
        for _ in range(300):
            await store.open_session(sid(), tenant="big")
        await store.list_sessions(tenant="small")  # the one-time fill of older sessions
        before = await hgetall_calls(raw)
        listed = await store.list_sessions(tenant="small")
        reads = await hgetall_calls(raw) - before
        assert [x["id"] for x in listed] == [mine] and reads == 1
        assert len(await store.list_sessions(tenant="big", limit=1000)) == 300
        # appends and ends keep the tenant's index ordered; delete removes the entry
        other = sid()
        await store.open_session(other, tenant="small")
        await store.append_result(mine, result())
        assert [x["id"] for x in await store.list_sessions(tenant="small")] == [mine, other]
        await store.close_session(other)
        assert [x["id"] for x in await store.list_sessions(tenant="small")] == [other, mine]
        assert [x["id"] for x in await store.list_sessions(tenant="small", state="active")] == [mine]
        await store.delete_session(other)
        assert await raw.zscore(f"{prefix}sessions:tenant{{small}}", other) is None
        assert [x["id"] for x in await store.list_sessions(tenant="small")] == [mine]
        await raw.aclose()
        await store.close()

    run(body())


def test_redis_tenant_index_is_filled_once_with_older_sessions(redis_url):
    """Sessions written before the tenant indexes existed are found by their tenant's listing."""
    import redis.asyncio as aioredis

    async def body():
        prefix = f"t{next(_prefixes)}:"
        store = RedisStore(redis_url, prefix=prefix)
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        old, new = sid(), sid()
        await store.open_session(old, tenant="acme")
        await raw.delete(f"{prefix}sessions:tenant{{acme}}")  # as written by the previous release
        await store.open_session(new, tenant="acme")
        assert [x["id"] for x in await store.list_sessions(tenant="acme")] == [new, old]
        assert await raw.get(f"{prefix}sessions:tenant-index") == "1"
        await raw.aclose()
        await store.close()

    run(body())
