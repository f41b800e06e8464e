"""Session ownership, end of idle/stale sessions, restart recovery and the metadata cap, against
every store backend (fixtures of tests/test_store.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from app.store import MetadataTooLarge, SessionNotFound
from app.store.sqlite import SQLiteStore
from tests import test_store as base
from tests.test_store import result, run, sid

make_store, redis_url = base.make_store, base.redis_url  # the backends' fixtures, reused


def test_tenant_is_stored_checked_and_filtered(make_store):
    async def body():
        store = make_store()
        a, b, legacy = sid(), sid(), sid()
        assert (await store.open_session(a, tenant="alice"))["tenant"] == "alice"
        await store.open_session(b, tenant="bob")
        await store.open_session(legacy)
        with pytest.raises(SessionNotFound):  # another tenant cannot re-open (or take over) it
            await store.open_session(a, {"x": 1}, tenant="bob")
        assert (await store.get_session(a))["metadata"] == {}
        await store.open_session(a, {"x": 1})  # no tenant: admin, no check
        assert {s["id"] for s in await store.list_sessions(tenant="alice")} == {a}
        assert {a, b, legacy} <= {s["id"] for s in await store.list_sessions()}
        assert (await store.get_session(legacy))["tenant"] is None

    run(body())


def test_idle_rest_sessions_end_and_streams_with_heartbeat_do_not(make_store):
    async def body():
        store = make_store()
        rest, live, dead = sid(), sid(), sid()
        await store.open_session(rest, source="rest")
        await store.append_result(rest, result())
        await store.open_session(live, source="stream")
        await store.open_session(dead, source="stream")
        assert await store.sweep(rest_idle_s=60, stream_stale_s=60) == 0
        await asyncio.sleep(0.6)
        await store.heartbeat(live)
        assert await store.sweep(rest_idle_s=0.5, stream_stale_s=0.5) == 2
        r, d, ended = [await store.get_session(x) for x in (rest, live, dead)]
        assert r["state"] == "ended" and r["end_reason"] == "idle"
        assert d["state"] == "active"
        assert ended["state"] == "ended" and ended["end_reason"] == "server_restart"
        again = await store.open_session(rest, source="rest")  # a new result re-opens it
        assert again["state"] == "active" and again["end_reason"] is None

    run(body())


def test_recover_ends_streams_of_a_dead_server(make_store):
    async def body():
        first = make_store()
        cut, rest = sid(), sid()
        await first.open_session(cut, source="stream")  # kill -9: never closed
        await first.open_session(rest, source="rest")
        await asyncio.sleep(0.3)
        second = make_store()
        assert await second.recover(stream_stale_s=0.2) >= 1
        view = await second.get_session(cut)
        assert view["state"] == "ended" and view["end_reason"] == "server_restart"
        assert (await second.get_session(rest))["state"] == "active"  # REST: the idle rule applies

    run(body())


def test_metadata_is_capped_and_keys_replace(make_store):
    async def body():
        store = make_store()
        s = sid()
        with pytest.raises(MetadataTooLarge):
            await store.open_session(s, {"blob": "x" * 17000})
        await store.open_session(s, {"blob": "x" * 10000})
        for _ in range(40):  # reconnects sending the same keys do not grow it
            await store.open_session(s, {"blob": "y" * 10000, "n": 1})
        view = await store.get_session(s)
        assert view["metadata"] == {"blob": "y" * 10000, "n": 1}
        with pytest.raises(MetadataTooLarge) as exc:
            await store.open_session(s, {"more": "z" * 7000})
        assert exc.value.status == 413 and exc.value.code == "metadata_too_large"
        assert (await store.get_session(s))["metadata"] == view["metadata"]

    run(body())


def test_sqlite_file_of_version_1_is_read(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, state TEXT NOT NULL, source TEXT NOT NULL, "
        "created_at REAL NOT NULL, updated_at REAL NOT NULL, ended_at REAL, metadata TEXT NOT NULL DEFAULT '{}', "
        "channels TEXT NOT NULL DEFAULT '[]', result_count INTEGER NOT NULL DEFAULT 0, "
        "last_seq INTEGER NOT NULL DEFAULT 0, audio_end REAL NOT NULL DEFAULT 0, emo_n INTEGER NOT NULL "
        "DEFAULT 0, emo_counts TEXT NOT NULL DEFAULT '{}', emo_psum TEXT NOT NULL DEFAULT '{}', last_result TEXT);"
        "PRAGMA user_version = 1;"
    )
    now = time.time()
    conn.execute(
        "INSERT INTO sessions (id, state, source, created_at, updated_at) VALUES ('old', 'active', 'stream', ?, ?)",
        (now, now),
    )
    conn.commit()
    conn.close()

    async def body():
        store = SQLiteStore(path)
        view = await store.get_session("old")
        assert view["tenant"] is None and view["state"] == "active"
        assert await store.recover() == 1
        assert (await store.get_session("old"))["end_reason"] == "server_restart"
        await store.close()

    run(body())
