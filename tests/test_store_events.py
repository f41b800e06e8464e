"""Roles, ISO times, alerts and events of the session store, against every backend (SQLite file,
real redis-server), plus the event buses (memory, Redis across "replicas")."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from datetime import datetime, timezone

import pytest

from app.store.alerts import AlertRule
from app.store.events import (
    Event,
    EventsUnavailable,
    MemoryEventBus,
    RedisEventBus,
    SubscriptionDropped,
    TooManySubscribers,
)
from app.store.publishing import PublishingStore
from app.store.redis import RedisStore
from app.store.sqlite import SQLiteStore
from tests import test_store as base
from tests.stream_support import free_port
from tests.test_store import result, run, sid

redis_url = base.redis_url  # the module-scoped redis-server fixture, reused

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
RULES = [AlertRule(name="angry_customer", role="customer", label="angry", min_score=0.6, consecutive=2)]
_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """(kind, factory(rules) of stores that share their data, factory of buses that share events)."""
    if request.param == "sqlite":
        path = tmp_path / "sessions.db"
        return (
            "sqlite",
            lambda rules=(): SQLiteStore(path, poll_interval_s=0.2, alert_rules=list(rules)),
            None,
        )
    url = request.getfixturevalue("redis_url")
    prefix = f"ev{next(_prefixes)}:"

    def store(rules=()):
        return RedisStore(url, prefix=prefix, ended_ttl_s=3600, alert_rules=list(rules))

    return "redis", store, lambda **kw: RedisEventBus(url, prefix=prefix, block_s=1.0, **kw)


def parse_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def test_iso_times_roles_and_received_at(backend):
    _, make, _ = backend

    async def body():
        store = make()
        s = sid()
        t0 = time.time()
        view = await store.open_session(s, roles=["agent", "customer"])
        assert view["roles"] == ["agent", "customer"] and view["alert_count"] == 0 and view["summary"] is None
        for key in ("created_at", "updated_at"):
            assert ISO.match(view[key]), view[key]
            assert abs(parse_iso(view[key]) - view[f"{key}_ts"]) < 0.001
        assert view["ended_at"] is None and view["ended_at_ts"] is None
        assert abs(view["created_at_ts"] - t0) < 5
        out = await store.append(s, result("angry", channel=1))
        assert out.seq == 1 and out.result["role"] == "customer" and ISO.match(out.result["received_at"])
        assert (await store.append(s, result(channel=0))).result["role"] == "agent"
        assert (await store.append(s, result(channel=2))).result["role"] is None  # beyond the roles
        named = await store.append(s, {**result(channel=1), "role": "supervisor"})  # its own role wins
        assert named.result["role"] == "supervisor"
        stored = await store.results(s)
        assert [x["role"] for x in stored] == ["customer", "agent", None, "supervisor"]
        assert stored[0] == out.result and stored[0]["words"]  # the store keeps the words
        assert await store.close_session(s) is True
        assert await store.close_session(s) is False  # already ended
        ended = await store.get_session(s)
        assert ISO.match(ended["ended_at"]) and ended["ended_at_ts"] >= ended["created_at_ts"]
        # roles change on re-open only when given
        assert (await store.open_session(s))["roles"] == ["agent", "customer"]
        assert (await store.open_session(s, roles=["a"]))["roles"] == ["a"]
        await store.close()

    run(body())


def test_alerts_fire_after_n_consecutive_are_stored_and_survive_a_restart(backend):
    _, make, _ = backend

    async def body():
        first = make(RULES)
        s = sid()
        await first.open_session(s, roles=["agent", "customer"])
        a1 = await first.append(s, result("angry", channel=1))  # customer angry 0.7: 1 in a row
        a2 = await first.append(s, result("angry", channel=0))  # agent: does not count
        assert a1.alerts == [] and a2.alerts == []
        assert await first.alerts(s) == []
        await first.close()

        second = make(RULES)  # a restart: the streak is stored with the session
        a3 = await second.append(s, result("angry", channel=1))
        assert [(a["rule"], a["seq"], a["seqs"]) for a in a3.alerts] == [("angry_customer", 3, [1, 3])]
        alert = a3.alerts[0]
        assert alert["role"] == "customer" and alert["score"] == 0.7 and ISO.match(alert["at"])
        assert (await second.append(s, result("angry", channel=1))).alerts == []  # same streak
        await second.close_session(s)
        await second.close()

        third = make(RULES)
        assert await third.alerts(s) == [alert]
        assert await third.alerts(s, after=3) == []
        view = await third.get_session(s)
        assert view["alert_count"] == 1
        await third.delete_session(s)
        assert await third.alerts(s) == []
        await third.close()

    run(body())


def test_concurrent_appends_with_rules_stay_gap_free(backend):
    _, make, _ = backend

    async def body():
        a, b = make(RULES), make(RULES)
        s = sid()
        await a.open_session(s, roles=["agent", "customer"])
        outs = await asyncio.gather(
            *[(a if i % 2 else b).append(s, result("angry", channel=1, text=str(i))) for i in range(20)]
        )
        assert sorted(o.seq for o in outs) == list(range(1, 21))
        fired = [al for o in outs for al in o.alerts]
        assert [al["seq"] for al in fired] == [2]  # 20 hits in a row: one streak, one alert at the 2nd
        assert [x["seq"] for x in await a.results(s)] == list(range(1, 21))
        await a.close()
        await b.close()

    run(body())


def test_redis_alerts_expire_with_the_session(redis_url):
    async def body():
        prefix = f"ev{next(_prefixes)}:"
        store = RedisStore(redis_url, prefix=prefix, ended_ttl_s=100, alert_rules=RULES)
        s = sid()
        await store.open_session(s, roles=["agent", "customer"])
        for _ in range(2):
            await store.append(s, result("angry", channel=1))
        key = f"{prefix}session{{{s}}}:alerts"
        assert await store._r.ttl(key) == -1  # active: kept
        await store.close_session(s)
        assert 0 < await store._r.ttl(key) <= 100
        await store.open_session(s)  # re-opened: kept again
        assert await store._r.ttl(key) == -1
        await store.close()

    run(body())


# --- event buses -------------------------------------------------------------------------------


def make_bus(backend, **kw):
    _, _, redis_bus = backend
    return MemoryEventBus(**kw) if redis_bus is None else redis_bus(**kw)


def ev(session="s", kind="result", tenant=None, **data):
    return Event(type=kind, session_id=session, tenant=tenant, data=data)


def test_bus_delivers_per_session_and_to_all_in_order(backend):
    async def body():
        bus = make_bus(backend)
        one = await bus.subscribe("s1")
        everything = await bus.subscribe(None)
        for i in range(5):
            await bus.publish(ev("s1" if i % 2 == 0 else "s2", n=i))
        got_one = [await one.get(2.0) for _ in range(3)]
        got_all = [await everything.get(2.0) for _ in range(5)]
        assert [e.data["n"] for e in got_one] == [0, 2, 4] and {e.session_id for e in got_one} == {"s1"}
        assert [e.data["n"] for e in got_all] == [0, 1, 2, 3, 4]
        ids = [e.id for e in got_all]
        assert ids == sorted(ids, key=lambda x: tuple(map(int, x.split("-"))))
        assert await one.get(0.2) is None  # nothing more: a timeout, not an error
        # resumption: what came after an id
        assert [e.data["n"] for e in await bus.history(ids[1])] == [2, 3, 4]
        one.close()
        everything.close()
        assert bus.subscriber_count == 0
        await bus.close()

    run(body())


def test_redis_bus_reaches_every_replica_and_listeners_run_once(redis_url):
    async def body():
        prefix = f"ev{next(_prefixes)}:"
        a = RedisEventBus(redis_url, prefix=prefix, block_s=1.0)
        b = RedisEventBus(redis_url, prefix=prefix, block_s=1.0)
        heard_a, heard_b = [], []
        a.add_listener(heard_a.append)
        b.add_listener(heard_b.append)
        sub_a, sub_b = await a.subscribe("x"), await b.subscribe("x")
        published = await a.publish(ev("x", "ended", tenant="t1", k=1))
        got = [await sub_a.get(3.0), await sub_b.get(3.0)]
        assert [g.id for g in got] == [published.id] * 2
        assert got[1].tenant == "t1" and got[1].type == "ended" and got[1].data == {"k": 1}
        assert [e.id for e in heard_a] == [published.id] and heard_b == []  # on the publisher only
        for bus in (a, b):
            await bus.close()

    run(body())


def test_slow_subscriber_is_dropped_and_holds_no_memory(backend):
    async def body():
        bus = make_bus(backend)
        slow = await bus.subscribe(None, queue_size=8)
        fast = await bus.subscribe(None, queue_size=10_000)
        blob = "x" * 10_000
        for i in range(300):
            await bus.publish(ev("s", n=i, blob=blob))
            assert slow.pending <= 9  # never more than the queue (+ the drop marker)
        received = 0
        while received < 300:
            e = await fast.get(5.0)
            assert e is not None
            received += 1
        assert slow.dropped and slow.pending == 1 and bus.subscriber_count == 1  # only the marker left
        with pytest.raises(SubscriptionDropped):
            await slow.get(1.0)
        fast.close()
        await bus.close()

    run(body())


def test_subscriber_limit(backend):
    async def body():
        bus = make_bus(backend, max_subscribers=2)
        subs = [await bus.subscribe("a"), await bus.subscribe(None)]
        with pytest.raises(TooManySubscribers) as busy:
            await bus.subscribe("b")
        assert busy.value.status == 503
        subs[0].close()
        (await bus.subscribe("b")).close()
        await bus.close()

    run(body())


# --- the publishing store ----------------------------------------------------------------------


async def drain(sub, until: str, timeout: float = 5.0) -> list[Event]:
    out: list[Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = await sub.get(max(0.01, deadline - time.monotonic()))
        if e is None:
            break
        out.append(e)
        if e.type == until:
            return out
    raise AssertionError(f"no {until} event; got {[x.type for x in out]}")


def test_publishing_store_announces_created_results_alerts_ended_deleted(backend):
    _, make, _ = backend

    async def body():
        bus = make_bus(backend)
        store = PublishingStore(make(RULES), bus)
        heard: list[Event] = []
        bus.add_listener(heard.append)
        s = sid()
        sub = await bus.subscribe(s)
        await store.open_session(s, tenant="acme", roles=["agent", "customer"])
        await store.open_session(s, tenant="acme")  # still active: not created again
        for ch in (1, 1, 0):
            await store.append_result(s, result("angry", channel=ch))
        await store.close_session(s)
        events = await drain(sub, "ended")
        assert [e.type for e in events] == ["created", "result", "result", "alert", "result", "ended"]
        assert {e.tenant for e in events} == {"acme"}
        assert [e.data["seq"] for e in events if e.type == "result"] == [1, 2, 3]
        assert events[1].data["role"] == "customer" and ISO.match(events[1].data["received_at"])
        assert events[3].data["rule"] == "angry_customer" and events[3].data["seqs"] == [1, 2]
        ended = events[-1].data
        assert ended["state"] == "ended" and ISO.match(ended["ended_at"]) and ended["alert_count"] == 1
        summary = ended["summary"]
        assert summary["utterances"] == 3 and summary["by_role"]["customer"]["utterances"] == 2
        assert summary["by_role"]["customer"]["mean_probabilities"]["angry"] == 0.7
        assert [e.type for e in heard] == [e.type for e in events]  # listeners saw the same
        assert await store.delete_session(s) is True
        assert [e.type for e in await drain(sub, "deleted")] == ["deleted"]
        sub.close()
        await store.close()
        await bus.close()

    run(body())


def test_idle_rest_sessions_end_with_an_event_and_expire(backend):
    kind, make, _ = backend

    async def body():
        bus = make_bus(backend)
        store = PublishingStore(make(), bus)
        s = sid()
        everything = await bus.subscribe(None)
        await store.open_session(s, source="rest")
        await store.append_result(s, result())
        await asyncio.sleep(0.6)
        assert await store.sweep(rest_idle_s=0.5, stream_stale_s=0) == 1
        events = await drain(everything, "ended")
        assert [e.type for e in events] == ["created", "result", "ended"]
        assert events[-1].data["end_reason"] == "idle" and events[-1].data["summary"]["utterances"] == 1
        if kind == "redis":  # ended sessions expire (EXPIRE on every key of the session)
            assert 0 < await store.backend._r.ttl(f"{store.backend.prefix}session{{{s}}}") <= 3600
        everything.close()
        await store.close()
        await bus.close()

    run(body())


def test_sqlite_ended_rest_sessions_are_forgotten_after_the_ttl(tmp_path):
    async def body():
        store = SQLiteStore(tmp_path / "ttl.db", ended_ttl_s=0.2, alert_rules=RULES)
        s = sid()
        await store.open_session(s, source="rest", roles=["agent", "customer"])
        for _ in range(2):
            await store.append(s, result("angry", channel=1))
        await asyncio.sleep(0.05)
        assert await store.sweep(rest_idle_s=0.01, stream_stale_s=0) == 1  # idle: ended
        await asyncio.sleep(0.3)
        store._last_prune = 0.0  # the prune runs at most every 10 minutes
        await store.open_session(sid())  # opening runs the prune
        assert await store.get_session(s) is None and await store.alerts(s) == []
        await store.close()

    run(body())


def test_publish_failure_does_not_fail_the_append(tmp_path):
    class DownBus(MemoryEventBus):
        async def publish(self, event):
            raise ConnectionError("redis is away")

    async def body():
        store = PublishingStore(SQLiteStore(tmp_path / "d.db"), DownBus())
        s = sid()
        await store.open_session(s)
        assert await store.append_result(s, result()) == 1
        assert await store.close_session(s) is True
        await store.close()

    run(body())


def test_event_json_roundtrip_for_redis(redis_url):
    async def body():
        bus = RedisEventBus(redis_url, prefix=f"ev{next(_prefixes)}:", block_s=1.0)
        sub = await bus.subscribe(None)
        data = {"seq": 1, "text": "naïve 😀\nnew line", "emotion": {"probabilities": {"angry": 0.123456789}}}
        await bus.publish(Event(type="result", session_id="s", data=data))
        got = await sub.get(3.0)
        assert got is not None and got.data == json.loads(json.dumps(data)) and got.tenant is None
        sub.close()
        await bus.close()

    run(body())


def test_redis_bus_without_redis_is_503_and_closes_promptly():
    async def body():
        bus = RedisEventBus(f"redis://127.0.0.1:{free_port()}/0", prefix="none:", block_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(EventsUnavailable) as exc:
            await bus.subscribe(None)
        assert exc.value.status == 503 and time.monotonic() - t0 < 15
        assert bus.subscriber_count == 0
        t0 = time.monotonic()
        await bus.close()
        assert time.monotonic() - t0 < 5

    run(body())


def test_redis_bus_close_with_a_busy_reader_is_bounded(redis_url):
    async def body():
        bus = RedisEventBus(redis_url, prefix=f"ev{next(_prefixes)}:", block_s=1.0)
        sub = await bus.subscribe(None)
        await bus.publish(ev("s", n=1))
        assert await sub.get(3.0) is not None  # the reader is back in XREAD BLOCK right now
        t0 = time.monotonic()
        await bus.close()
        assert time.monotonic() - t0 < 4 and bus._reader is not None and bus._reader.done()
        with pytest.raises(SubscriptionDropped):
            await sub.get(1.0)

    run(body())


def test_a_cancelled_reader_stops_even_when_its_event_arrives_at_that_moment():
    """Python 3.11's wait_for returns the result and swallows the cancellation when both happen in
    one loop turn; a stream's reader must stop (this kept event streams running after disconnect)."""

    async def body():
        bus = MemoryEventBus()
        sub = await bus.subscribe("s")
        reader = asyncio.ensure_future(sub.get(10.0))
        await asyncio.sleep(0.01)  # blocked on the empty queue
        sub.offer(ev("s", n=1))  # the event arrives ...
        await asyncio.sleep(0)  # ... the queue's getter takes it ...
        reader.cancel()  # ... and the reader is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await reader
        sub.close()
        with pytest.raises(SubscriptionDropped):  # a closed subscription does not wait
            await sub.get(10.0)

    run(body())
