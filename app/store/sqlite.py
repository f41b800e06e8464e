"""SQLite session store: the embedded default. One file, WAL journal, survives restarts.

Schema (``user_version`` 3; older files get the added columns, NULL / 0, and the alerts table on open)::

    sessions(id TEXT PRIMARY KEY, state TEXT, source TEXT, created_at REAL, updated_at REAL,
             ended_at REAL NULL, metadata TEXT json, channels TEXT json list, result_count INT,
             last_seq INT, audio_end REAL, emo_n INT, emo_counts TEXT json, emo_psum TEXT json,
             last_result TEXT json NULL, tenant TEXT NULL, end_reason TEXT NULL,
             heartbeat_at REAL NULL, roles TEXT json NULL, alert_state TEXT json NULL,
             alert_count INT)
    results(session_id TEXT, seq INT, created_at REAL, channel INT, data TEXT json,
            PRIMARY KEY (session_id, seq)) WITHOUT ROWID
    alerts(session_id TEXT, seq INT, rule TEXT, created_at REAL, data TEXT json,
           PRIMARY KEY (session_id, seq, rule)) WITHOUT ROWID

Sequence numbers: ``append_result`` runs ``BEGIN IMMEDIATE`` (the write lock of the whole file),
increments ``sessions.last_seq`` and inserts the result in the same transaction, so numbers are
gap-free and unique even when several processes share the file. The alert rules are evaluated in
that transaction too (``app.store.alerts.step`` on the stored ``alert_state``), so an alert is stored
exactly when its result is.

Thread-safety: every SQLite call runs on one dedicated thread that owns the only connection (a
single-worker executor, ``app.store.sqlite_thread.SQLiteThread``), so the connection is never shared across threads; the async methods may
be awaited from any event loop. A SQLite file belongs to one server process at a time:
``recover`` (at start-up) ends every stream session still marked active. Long polls wake through ``Waiters`` as soon as this process
appends; writes from *other* processes are noticed by re-querying every ``poll_interval_s``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from app.store.alerts import AlertRule, step
from app.store.common import (
    ACTIVE,
    END_IDLE,
    END_RESTART,
    ENDED,
    MAX_METADATA_BYTES,
    Appended,
    RawSession,
    ResultStats,
    SessionNotFound,
    Waiters,
    check_source,
    check_state,
    dump_roles,
    iso,
    load_roles,
    merged_metadata,
    session_view,
    stamp,
    stored_body,
)
from app.store.sqlite_thread import SQLiteThread

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ended_at REAL,
    metadata TEXT NOT NULL DEFAULT '{}',
    channels TEXT NOT NULL DEFAULT '[]',
    result_count INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    audio_end REAL NOT NULL DEFAULT 0,
    emo_n INTEGER NOT NULL DEFAULT 0,
    emo_counts TEXT NOT NULL DEFAULT '{}',
    emo_psum TEXT NOT NULL DEFAULT '{}',
    last_result TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_update ON sessions (updated_at DESC);
CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state, updated_at DESC);
CREATE TABLE IF NOT EXISTS results (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created_at REAL NOT NULL,
    channel INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
"""
# Columns added after version 1 (ALTER TABLE on older files), then what depends on them.
_ADDED_COLUMNS = (("tenant", "TEXT"), ("end_reason", "TEXT"), ("heartbeat_at", "REAL"))
_SCHEMA_2 = """
CREATE INDEX IF NOT EXISTS sessions_by_tenant ON sessions (tenant, updated_at DESC);
PRAGMA user_version = 2;
"""
# Version 3: roles, alert state and count per session; alerts stored with their session.
_ADDED_COLUMNS_3 = (
    ("roles", "TEXT"),
    ("alert_state", "TEXT"),
    ("alert_count", "INTEGER NOT NULL DEFAULT 0"),
)
_SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS alerts (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    rule TEXT NOT NULL,
    created_at REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (session_id, seq, rule)
) WITHOUT ROWID;
PRAGMA user_version = 3;
"""

_COLUMNS = (
    "id, state, source, created_at, updated_at, ended_at, metadata, channels, result_count, last_seq, "
    "audio_end, emo_n, emo_counts, emo_psum, last_result, tenant, end_reason, heartbeat_at, roles, "
    "alert_count"
)


def _raw(row: tuple) -> RawSession:
    return RawSession(
        id=row[0],
        state=row[1],
        source=row[2],
        created_at=row[3],
        updated_at=row[4],
        ended_at=row[5],
        metadata=json.loads(row[6]),
        channels=json.loads(row[7]),
        result_count=row[8],
        last_seq=row[9],
        audio_end=row[10],
        emo_n=row[11],
        emo_counts=json.loads(row[12]),
        emo_psum=json.loads(row[13]),
        last_result=json.loads(row[14]) if row[14] else None,
        tenant=row[15],
        end_reason=row[16],
        heartbeat_at=row[17],
        roles=load_roles(row[18]),
        alert_count=row[19] or 0,
    )


class SQLiteStore:
    """``SessionStore`` over one SQLite file (``:memory:`` works too, for one process)."""

    def __init__(
        self,
        path: str | Path,
        ended_ttl_s: float = 7 * 86400.0,
        poll_interval_s: float = 1.0,
        max_metadata_bytes: int = MAX_METADATA_BYTES,
        alert_rules: list[AlertRule] | None = None,
    ):
        self.path = str(path)
        self.alert_rules = list(alert_rules or [])
        self.ended_ttl_s = ended_ttl_s
        self.max_metadata_bytes = max_metadata_bytes
        self.poll_interval_s = poll_interval_s
        self._waiters = Waiters()
        # One thread owns the connection: sqlite3 connections must not be used concurrently.
        self._thread = SQLiteThread(self._connect, "sqlite-store", "the session store")
        self._last_prune = 0.0

    # --- plumbing ----------------------------------------------------------------------------

    async def _run(self, fn, *args):
        return await self._thread.run(fn, *args)

    def _db(self) -> sqlite3.Connection:
        """The connection, opened on first use (on the store thread)."""
        return self._thread.conn()

    def _connect(self) -> sqlite3.Connection:
        """Open the file and create or upgrade the schema (on the store thread)."""
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves, so transactions are explicit.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        have = {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
        for name, kind in _ADDED_COLUMNS + _ADDED_COLUMNS_3:
            if name not in have:
                conn.execute(f"ALTER TABLE sessions ADD COLUMN {name} {kind}")
        conn.executescript(_SCHEMA_2)
        conn.executescript(_SCHEMA_3)
        return conn

    def _tx(self, fn):
        """Run ``fn(conn)`` inside BEGIN IMMEDIATE ... COMMIT (rolled back on error)."""
        return self._thread.tx(fn)

    def _get_raw(self, conn: sqlite3.Connection, session_id: str) -> RawSession | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return _raw(row) if row else None

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Forget ended sessions older than the retention period (at most every 10 minutes)."""
        if self.ended_ttl_s <= 0 or now - self._last_prune < 600.0:
            return
        self._last_prune = now
        cutoff = now - self.ended_ttl_s
        for table in ("results", "alerts"):
            conn.execute(
                f"DELETE FROM {table} WHERE session_id IN "
                "(SELECT id FROM sessions WHERE state = ? AND updated_at < ?)",
                (ENDED, cutoff),
            )
        conn.execute("DELETE FROM sessions WHERE state = ? AND updated_at < ?", (ENDED, cutoff))

    # --- SessionStore ------------------------------------------------------------------------

    async def open_session(
        self,
        session_id: str,
        metadata: dict[str, Any] | None = None,
        source: str = "stream",
        tenant: str | None = None,
        roles: list[str] | None = None,
    ) -> dict:
        """Create the session, or re-open an existing one (state back to active, metadata merged).

        ``tenant``: the owner recorded on creation; re-opening a session of another tenant raises
        ``SessionNotFound`` (None: no check, as for admins). ``MetadataTooLarge`` beyond the cap.
        ``roles`` (index = channel) replace the stored ones when given.
        """
        check_source(source)

        def op(conn: sqlite3.Connection) -> RawSession:
            now = time.time()
            self._prune(conn, now)
            raw = self._get_raw(conn, session_id)
            if raw is None:
                meta_json = merged_metadata({}, metadata, self.max_metadata_bytes)
                conn.execute(
                    "INSERT INTO sessions (id, state, source, created_at, updated_at, metadata, tenant, "
                    "heartbeat_at, roles) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (session_id, ACTIVE, source, now, now, meta_json, tenant, now, dump_roles(roles)),
                )
            else:
                if tenant is not None and raw.tenant != tenant:
                    raise SessionNotFound(session_id)
                merged = merged_metadata(raw.metadata, metadata, self.max_metadata_bytes)
                conn.execute(
                    "UPDATE sessions SET state = ?, updated_at = ?, ended_at = NULL, end_reason = NULL, "
                    "heartbeat_at = ?, metadata = ? WHERE id = ?",
                    (ACTIVE, now, now, merged, session_id),
                )
                if roles is not None:
                    conn.execute(
                        "UPDATE sessions SET roles = ? WHERE id = ?", (dump_roles(roles), session_id)
                    )
            fresh = self._get_raw(conn, session_id)
            assert fresh is not None  # written just above, in this same transaction
            return fresh

        raw = await self._run(self._tx, op)
        return session_view(raw)

    async def close_session(self, session_id: str, reason: str | None = None) -> bool:
        """End an active session; True when this call ended it (False: unknown or already ended)."""

        def op(conn: sqlite3.Connection) -> bool:
            now = time.time()
            return (
                conn.execute(
                    "UPDATE sessions SET state = ?, ended_at = ?, updated_at = ?, end_reason = ? "
                    "WHERE id = ? AND state = ?",
                    (ENDED, now, now, reason, session_id, ACTIVE),
                ).rowcount
                > 0
            )

        ended = await self._run(self._tx, op)
        self._waiters.notify(session_id)  # long polls return at once on an ended session
        return bool(ended)

    async def heartbeat(self, session_id: str) -> None:
        """A live stream's sign of life (see ``sweep``)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE sessions SET heartbeat_at = ? WHERE id = ? AND state = ?",
                (time.time(), session_id, ACTIVE),
            )

        await self._run(self._tx, op)

    def _end_where(self, conn: sqlite3.Connection, where: str, args: tuple, reason: str) -> list[str]:
        now = time.time()
        ids = [
            r[0]
            for r in conn.execute(f"SELECT id FROM sessions WHERE state = ? AND {where}", (ACTIVE, *args))
        ]
        conn.executemany(
            "UPDATE sessions SET state = ?, ended_at = ?, updated_at = ?, end_reason = ? WHERE id = ? AND state = ?",
            [(ENDED, now, now, reason, sid, ACTIVE) for sid in ids],
        )
        return ids

    async def sweep(self, rest_idle_s: float = 900.0, stream_stale_s: float = 90.0) -> int:
        """End REST sessions idle for ``rest_idle_s`` (reason ``idle``) and stream sessions without a
        heartbeat or result for ``stream_stale_s`` (``server_restart``); 0 turns a rule off.
        Returns how many sessions it ended."""
        return len(await self.sweep_ended(rest_idle_s, stream_stale_s))

    async def sweep_ended(self, rest_idle_s: float = 900.0, stream_stale_s: float = 90.0) -> list[str]:
        """``sweep``, returning the ids of the sessions it ended."""

        def op(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            ended: list[str] = []
            if rest_idle_s > 0:
                ended += self._end_where(
                    conn, "source = 'rest' AND updated_at < ?", (now - rest_idle_s,), END_IDLE
                )
            if stream_stale_s > 0:
                ended += self._end_where(
                    conn,
                    "source = 'stream' AND MAX(updated_at, COALESCE(heartbeat_at, 0)) < ?",
                    (now - stream_stale_s,),
                    END_RESTART,
                )
            return ended

        ended = await self._run(self._tx, op)
        for sid in ended:
            self._waiters.notify(sid)
        return ended

    async def recover(self, stream_stale_s: float = 90.0) -> int:
        """At server start: every stream session still active was cut by the previous process
        (the file belongs to one process), so end it with reason ``server_restart``."""
        return len(await self.recover_ended(stream_stale_s))

    async def recover_ended(self, stream_stale_s: float = 90.0) -> list[str]:
        """``recover``, returning the ids of the sessions it ended."""
        ended: list[str] = await self._run(
            self._tx, lambda conn: self._end_where(conn, "source = 'stream'", (), END_RESTART)
        )
        return ended

    async def append_result(self, session_id: str, result: dict[str, Any]) -> int:
        return (await self.append(session_id, result)).seq

    async def append(self, session_id: str, result: dict[str, Any]) -> Appended:
        """``append_result`` returning the stored result and the alerts it fired (``Appended``)."""
        stats = ResultStats.of(result)

        def op(conn: sqlite3.Connection) -> Appended:
            raw = self._get_raw(conn, session_id)
            if raw is None:
                raise SessionNotFound(session_id)
            now = time.time()
            seq = raw.last_seq + 1
            stored = stamp(stored_body(result, raw.roles, now), session_id, seq)
            alerts = self._alerts_step(conn, session_id, stored, now) if self.alert_rules else []
            data = json.dumps(stored)
            channels = sorted(set(raw.channels) | {stats.channel})
            if stats.label is not None:
                raw.emo_n += 1
                raw.emo_counts[stats.label] = raw.emo_counts.get(stats.label, 0) + 1
                for k, p in stats.probabilities.items():
                    raw.emo_psum[k] = raw.emo_psum.get(k, 0.0) + p
            conn.execute(
                "INSERT INTO results (session_id, seq, created_at, channel, data) VALUES (?, ?, ?, ?, ?)",
                (session_id, seq, now, stats.channel, data),
            )
            conn.execute(
                "UPDATE sessions SET last_seq = ?, result_count = result_count + 1, updated_at = ?, "
                "channels = ?, audio_end = MAX(audio_end, ?), emo_n = ?, emo_counts = ?, emo_psum = ?, "
                "last_result = ? WHERE id = ?",
                (
                    seq,
                    now,
                    json.dumps(channels),
                    stats.end,
                    raw.emo_n,
                    json.dumps(raw.emo_counts),
                    json.dumps(raw.emo_psum),
                    data,
                    session_id,
                ),
            )
            return Appended(seq=seq, result=stored, alerts=alerts, tenant=raw.tenant)

        appended: Appended = await self._run(self._tx, op)
        self._waiters.notify(session_id)
        return appended

    def _alerts_step(
        self, conn: sqlite3.Connection, session_id: str, stored: dict[str, Any], now: float
    ) -> list[dict[str, Any]]:
        """Evaluate the alert rules on ``stored`` and store what fired (inside the append's transaction)."""
        row = conn.execute("SELECT alert_state FROM sessions WHERE id = ?", (session_id,)).fetchone()
        state = json.loads(row[0]) if row and row[0] else {}
        new_state, alerts = step(self.alert_rules, state, stored, session_id, iso(now) or "")
        if new_state != state:
            conn.execute(
                "UPDATE sessions SET alert_state = ? WHERE id = ?", (json.dumps(new_state), session_id)
            )
        if alerts:
            conn.executemany(
                "INSERT OR REPLACE INTO alerts (session_id, seq, rule, created_at, data) VALUES (?, ?, ?, ?, ?)",
                [(session_id, a["seq"], a["rule"], now, json.dumps(a)) for a in alerts],
            )
            conn.execute(
                "UPDATE sessions SET alert_count = alert_count + ? WHERE id = ?", (len(alerts), session_id)
            )
        return alerts

    async def alerts(self, session_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        """Alerts of the session whose result ``seq > after``, in order (empty for unknown ids)."""

        def op() -> list[dict]:
            rows = (
                self._db()
                .execute(
                    "SELECT data FROM alerts WHERE session_id = ? AND seq > ? ORDER BY seq, rule LIMIT ?",
                    (session_id, int(after), max(1, int(limit))),
                )
                .fetchall()
            )
            return [json.loads(r[0]) for r in rows]

        return await self._run(op)

    async def ping(self) -> None:
        """Cheap health check (``/readyz``): one trivial query on the store's connection."""
        await self._run(lambda: self._db().execute("SELECT 1").fetchone())

    async def get_session(self, session_id: str) -> dict | None:
        raw = await self._run(lambda: self._get_raw(self._db(), session_id))
        return session_view(raw) if raw else None

    async def list_sessions(
        self, state: str | None = None, limit: int = 100, tenant: str | None = None
    ) -> list[dict]:
        """Newest first; ``tenant``: only that tenant's sessions (None = every session)."""
        check_state(state)
        limit = max(0, int(limit))

        def op() -> list[RawSession]:
            where, args = [], []
            if state is not None:
                where.append("state = ?")
                args.append(state)
            if tenant is not None:
                where.append("tenant = ?")
                args.append(tenant)
            sql = f"SELECT {_COLUMNS} FROM sessions"
            if where:
                sql += " WHERE " + " AND ".join(where)
            rows = self._db().execute(sql + " ORDER BY updated_at DESC LIMIT ?", (*args, limit)).fetchall()
            return [_raw(r) for r in rows]

        now = time.time()
        return [session_view(r, now) for r in await self._run(op)]

    async def results(
        self, session_id: str, after: int = 0, wait_s: float = 0.0, limit: int = 1000
    ) -> list[dict]:
        """Results with ``seq > after`` in order; with ``wait_s`` > 0, wait until one exists.

        Returns early (possibly empty) when the session is unknown, deleted or ended.
        """
        limit = max(1, int(limit))

        def op() -> tuple[str | None, list[dict]]:
            conn = self._db()
            row = conn.execute("SELECT state FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                return None, []
            rows = conn.execute(
                "SELECT data FROM results WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (session_id, int(after), limit),
            ).fetchall()
            return row[0], [json.loads(r[0]) for r in rows]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        while True:
            # Register before querying: an append between the query and the wait still wakes us.
            token = self._waiters.register(session_id)
            try:
                state, out = await self._run(op)
                remaining = deadline - loop.time()
                if out or state != ACTIVE or remaining <= 0:
                    return out
                try:
                    await asyncio.wait_for(token[1].wait(), timeout=min(remaining, self.poll_interval_s))
                except asyncio.TimeoutError:
                    pass  # re-query: another process may have written
            finally:
                self._waiters.unregister(session_id, token)

    async def delete_session(self, session_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM results WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM alerts WHERE session_id = ?", (session_id,))
            return conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0

        existed = await self._run(self._tx, op)
        self._waiters.notify(session_id)
        return existed

    async def close(self) -> None:
        await self._thread.close()
