"""Durable job and webhook-delivery records: one SQLite file (``<jobs_dir>/jobs.db``), WAL journal.

Why SQLite per server, also when sessions live in Redis: a job's uploaded audio is a file on the
disk of the server that received it, so only that server can run the job; keeping the record next to
the file (same disk, same lifetime) means a record never points at audio another replica cannot
read, and a restart finds both. What other replicas need, the job's *results*, go to the session
store (Redis or SQLite) as the job runs, so any replica serves ``/v1/sessions/{id}/...``. Job status
(``/v1/jobs/{id}``) is answered by the replica that holds the job: route ``/v1/jobs*`` with sticky
sessions, or run jobs on one replica. Like the session SQLite file, a jobs file belongs to one
server process at a time: at start-up every job still ``running`` was cut off and is queued again.

Schema::

    jobs(id TEXT PK, tenant, status queued|running|done|failed, session_id, session_owned INT,
         options JSON, webhook, audio_path, filename, audio_bytes, duration_s, channels,
         decoded_bytes, segments_total, segments_done, error JSON, result JSON,
         cancel_requested INT, runs INT, created_at, updated_at, started_at, finished_at)
    deliveries(id TEXT PK, job_id, target, event, body TEXT (the exact bytes signed and sent),
               status pending|delivered|failed, attempts, last_status_code, last_error,
               next_attempt_at, created_at, updated_at, delivered_at)

A job's end and its webhook deliveries are written in one transaction (``finish``): a crash can
lose neither one without the other.

Thread-safety: every SQLite call runs on one dedicated thread that owns the only connection; the
async methods may be awaited from any event loop.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.store.sqlite_thread import SQLiteThread

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
JOB_STATES = (QUEUED, RUNNING, DONE, FAILED)
ACTIVE_STATES = (QUEUED, RUNNING)
PENDING, DELIVERED = "pending", "delivered"  # a delivery's states, with FAILED

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT,
    status TEXT NOT NULL,
    session_id TEXT NOT NULL,
    session_owned INTEGER NOT NULL DEFAULT 0,
    options TEXT NOT NULL DEFAULT '{}',
    webhook TEXT,
    audio_path TEXT,
    filename TEXT,
    audio_bytes INTEGER NOT NULL DEFAULT 0,
    duration_s REAL NOT NULL DEFAULT 0,
    channels INTEGER NOT NULL DEFAULT 1,
    decoded_bytes INTEGER NOT NULL DEFAULT 0,
    segments_total INTEGER,
    segments_done INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created_at DESC);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT,
    target TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status_code INTEGER,
    last_error TEXT,
    next_attempt_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries (job_id);
PRAGMA user_version = 1;
"""


def iso(ts: float | None) -> str | None:
    """Unix seconds -> ISO-8601 UTC with milliseconds (``2026-12-02T04:01:02.123Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    id: str
    status: str
    session_id: str
    created_at: float
    updated_at: float
    tenant: str | None = None
    session_owned: bool = False  # the server named the session (job-<id>): it ends with the job
    options: dict[str, Any] = field(default_factory=dict)
    webhook: str | None = None
    audio_path: str | None = None
    filename: str | None = None
    audio_bytes: int = 0
    duration_s: float = 0.0
    channels: int = 1
    decoded_bytes: int = 0
    segments_total: int | None = None
    segments_done: int = 0
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    cancel_requested: bool = False
    runs: int = 0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def progress(self) -> float:
        if self.status == DONE:
            return 1.0
        if not self.segments_total:
            return 0.0
        return round(min(1.0, self.segments_done / self.segments_total), 4)

    @property
    def finished(self) -> bool:
        return self.status in (DONE, FAILED)

    def public(self) -> dict[str, Any]:
        """The API/webhook view of the job (times ISO-8601 UTC; no paths, no tenant secrets)."""
        return {
            "job_id": self.id,
            "status": self.status,
            "progress": self.progress,
            "segments_done": self.segments_done,
            "segments_total": self.segments_total,
            "session_id": self.session_id,
            "error": self.error,
            "result": self.result,
            "options": self.options,
            "webhook": self.webhook,
            "file": {
                "filename": self.filename,
                "bytes": self.audio_bytes,
                "duration_s": round(self.duration_s, 3),
                "channels": self.channels,
            },
            "tenant": self.tenant,
            "runs": self.runs,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


@dataclass
class Delivery:
    id: str
    target: str
    event: str
    body: str
    created_at: float
    updated_at: float
    status: str = PENDING
    job_id: str | None = None
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: float | None = None
    delivered_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": self.event,
            "target": self.target,
            "status": self.status,
            "attempts": self.attempts,
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
            "next_attempt_at": iso(self.next_attempt_at) if self.status == PENDING else None,
            "created_at": iso(self.created_at),
            "delivered_at": iso(self.delivered_at),
        }


_JOB_COLUMNS = tuple(f.name for f in fields(Job))
_DELIVERY_COLUMNS = tuple(f.name for f in fields(Delivery))
_JSON_JOB = ("options", "error", "result")
_BOOL_JOB = ("session_owned", "cancel_requested")


def _job_row(job: Job) -> tuple:
    out = []
    for name in _JOB_COLUMNS:
        value = getattr(job, name)
        if name in _JSON_JOB:
            value = None if value is None else json.dumps(value)
        elif name in _BOOL_JOB:
            value = int(bool(value))
        out.append(value)
    return tuple(out)


def _job(row: tuple) -> Job:
    values = dict(zip(_JOB_COLUMNS, row, strict=True))
    for name in _JSON_JOB:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    for name in _BOOL_JOB:
        values[name] = bool(values[name])
    return Job(**values)


def _delivery(row: tuple) -> Delivery:
    return Delivery(**dict(zip(_DELIVERY_COLUMNS, row, strict=True)))


_JOB_SELECT = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"
_DELIVERY_SELECT = f"SELECT {', '.join(_DELIVERY_COLUMNS)} FROM deliveries"


class JobStore:
    """Jobs and deliveries in ``<directory>/jobs.db``; uploaded audio in ``<directory>/audio/``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / "jobs.db"
        self.audio_dir = self.directory / "audio"
        self._thread = SQLiteThread(self._connect, "jobs-store", "the job store")

    # --- plumbing ----------------------------------------------------------------------------

    async def _run(self, fn, *args):
        return await self._thread.run(fn, *args)

    def _db(self) -> sqlite3.Connection:
        return self._thread.conn()

    def _connect(self) -> sqlite3.Connection:
        self.audio_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        return conn

    async def _write(self, fn, *args):
        return await self._run(self._thread.tx, fn, *args)

    async def _read(self, fn, *args):
        return await self._run(lambda: fn(self._db(), *args))

    async def open(self) -> None:
        """Create the directory and the schema now (start-up), so a bad data dir fails loudly."""
        await self._read(lambda conn: None)

    async def close(self) -> None:
        await self._thread.close()

    # --- jobs --------------------------------------------------------------------------------

    async def create(self, job: Job, max_active: int) -> bool:
        """Insert ``job`` unless ``max_active`` jobs are already queued or running (then False)."""

        def op(conn: sqlite3.Connection) -> bool:
            (active,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", ACTIVE_STATES
            ).fetchone()
            if active >= max_active:
                return False
            marks = ", ".join("?" for _ in _JOB_COLUMNS)
            conn.execute(f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({marks})", _job_row(job))
            return True

        return await self._write(op)

    async def active_count(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            sql = "SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)"
            return conn.execute(sql, ACTIVE_STATES).fetchone()[0]

        return await self._read(op)

    async def get(self, job_id: str) -> Job | None:
        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(f"{_JOB_SELECT} WHERE id = ?", (job_id,)).fetchone()
            return _job(row) if row else None

        return await self._read(op)

    async def list_jobs(
        self, tenant: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[Job]:
        """Newest first; ``tenant``: only that tenant's jobs (None = all)."""

        def op(conn: sqlite3.Connection) -> list[Job]:
            where, args = [], []
            if tenant is not None:
                where.append("tenant = ?")
                args.append(tenant)
            if status is not None:
                where.append("status = ?")
                args.append(status)
            sql = _JOB_SELECT + (" WHERE " + " AND ".join(where) if where else "")
            rows = conn.execute(sql + " ORDER BY created_at DESC LIMIT ?", (*args, int(limit))).fetchall()
            return [_job(r) for r in rows]

        return await self._read(op)

    async def claim_next(self) -> Job | None:
        """The oldest queued job (not being cancelled), now ``running`` (``runs`` counted)."""

        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(
                f"{_JOB_SELECT} WHERE status = ? AND cancel_requested = 0 ORDER BY created_at LIMIT 1",
                (QUEUED,),
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            conn.execute(
                "UPDATE jobs SET status = ?, runs = runs + 1, updated_at = ?, "
                "started_at = COALESCE(started_at, ?) WHERE id = ?",
                (RUNNING, now, now, row[0]),
            )
            fresh = conn.execute(f"{_JOB_SELECT} WHERE id = ?", (row[0],)).fetchone()
            return _job(fresh)

        return await self._write(op)

    async def requeue_running(self) -> int:
        """At start-up: jobs left ``running`` by a previous process go back to ``queued``."""

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE jobs SET status = ?, updated_at = ? WHERE status = ?", (QUEUED, time.time(), RUNNING)
            ).rowcount

        return await self._write(op)

    async def requeue(self, job_id: str) -> None:
        """A running job interrupted by a shutdown: queued again (it resumes on the next start)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
                (QUEUED, time.time(), job_id, RUNNING),
            )

        await self._write(op)

    async def request_cancel(self, job_id: str) -> Job | None:
        """Mark an unfinished job as being cancelled (``claim_next`` skips it from now on)."""

        def op(conn: sqlite3.Connection) -> Job | None:
            conn.execute(
                "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ? AND status IN (?, ?)",
                (time.time(), job_id, *ACTIVE_STATES),
            )
            row = conn.execute(f"{_JOB_SELECT} WHERE id = ?", (job_id,)).fetchone()
            return _job(row) if row else None

        return await self._write(op)

    async def cancelled_queued(self) -> list[Job]:
        """Queued jobs whose cancellation was asked for but not completed (e.g. across a restart)."""

        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                f"{_JOB_SELECT} WHERE status = ? AND cancel_requested = 1", (QUEUED,)
            ).fetchall()
            return [_job(r) for r in rows]

        return await self._read(op)

    async def progress(self, job_id: str, done: int, total: int | None = None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if total is None:
                conn.execute(
                    "UPDATE jobs SET segments_done = ?, updated_at = ? WHERE id = ?",
                    (done, time.time(), job_id),
                )
            else:
                conn.execute(
                    "UPDATE jobs SET segments_done = ?, segments_total = ?, updated_at = ? WHERE id = ?",
                    (done, total, time.time(), job_id),
                )

        await self._write(op)

    async def finish(
        self,
        job_id: str,
        status: str,
        build_deliveries,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Job | None:
        """End an unfinished job as ``done``/``failed`` and insert ``build_deliveries(job)`` (a list of
        ``Delivery``, built from the finished job) in the same transaction. None when it had already
        finished (nothing written)."""
        if status not in (DONE, FAILED):
            raise ValueError(f"a job finishes as done or failed, not {status!r}")

        def op(conn: sqlite3.Connection) -> Job | None:
            now = time.time()
            changed = conn.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, updated_at = ?, finished_at = ? "
                "WHERE id = ? AND status IN (?, ?)",
                (
                    status,
                    None if result is None else json.dumps(result),
                    None if error is None else json.dumps(error),
                    now,
                    now,
                    job_id,
                    *ACTIVE_STATES,
                ),
            ).rowcount
            if not changed:
                return None
            job = _job(conn.execute(f"{_JOB_SELECT} WHERE id = ?", (job_id,)).fetchone())
            for d in build_deliveries(job):
                self._insert_delivery(conn, d)
            return job

        return await self._write(op)

    async def delete(self, job_id: str) -> bool:
        """Forget a finished job and its settled deliveries (pending ones are still delivered)."""

        def op(conn: sqlite3.Connection) -> bool:
            gone = conn.execute(
                "DELETE FROM jobs WHERE id = ? AND status IN (?, ?)", (job_id, DONE, FAILED)
            ).rowcount
            if gone:
                conn.execute("DELETE FROM deliveries WHERE job_id = ? AND status != ?", (job_id, PENDING))
            return gone > 0

        return await self._write(op)

    async def referenced_audio(self) -> set[str]:
        """Audio paths of unfinished jobs (anything else in ``audio_dir`` is an orphan)."""

        def op(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(
                "SELECT audio_path FROM jobs WHERE status IN (?, ?) AND audio_path IS NOT NULL", ACTIVE_STATES
            ).fetchall()
            return {r[0] for r in rows}

        return await self._read(op)

    async def prune(self, ttl_s: float) -> int:
        """Forget finished jobs and settled deliveries older than ``ttl_s``; returns jobs removed."""

        def op(conn: sqlite3.Connection) -> int:
            cutoff = time.time() - ttl_s
            n = conn.execute(
                "DELETE FROM jobs WHERE status IN (?, ?) AND finished_at < ?", (DONE, FAILED, cutoff)
            ).rowcount
            conn.execute("DELETE FROM deliveries WHERE status != ? AND updated_at < ?", (PENDING, cutoff))
            return n

        return await self._write(op)

    # --- deliveries --------------------------------------------------------------------------

    @staticmethod
    def _insert_delivery(conn: sqlite3.Connection, d: Delivery) -> None:
        marks = ", ".join("?" for _ in _DELIVERY_COLUMNS)
        conn.execute(
            f"INSERT INTO deliveries ({', '.join(_DELIVERY_COLUMNS)}) VALUES ({marks})",
            tuple(getattr(d, name) for name in _DELIVERY_COLUMNS),
        )

    async def add_delivery(self, delivery: Delivery) -> None:
        await self._write(self._insert_delivery, delivery)

    async def get_delivery(self, delivery_id: str) -> Delivery | None:
        def op(conn: sqlite3.Connection) -> Delivery | None:
            row = conn.execute(f"{_DELIVERY_SELECT} WHERE id = ?", (delivery_id,)).fetchone()
            return _delivery(row) if row else None

        return await self._read(op)

    async def deliveries_of(self, job_id: str) -> list[Delivery]:
        def op(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(
                f"{_DELIVERY_SELECT} WHERE job_id = ? ORDER BY created_at", (job_id,)
            ).fetchall()
            return [_delivery(r) for r in rows]

        return await self._read(op)

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, oldest due first."""

        def op(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(
                f"{_DELIVERY_SELECT} WHERE status = ? AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
                (PENDING, now, int(limit)),
            ).fetchall()
            return [_delivery(r) for r in rows]

        return await self._read(op)

    async def next_due_at(self, exclude: tuple[str, ...] = ()) -> float | None:
        """When the next pending delivery (not one of ``exclude``, those in flight) is due."""

        def op(conn: sqlite3.Connection) -> float | None:
            sql = "SELECT MIN(next_attempt_at) FROM deliveries WHERE status = ?"
            if exclude:
                sql += f" AND id NOT IN ({', '.join('?' for _ in exclude)})"
            return conn.execute(sql, (PENDING, *exclude)).fetchone()[0]

        return await self._read(op)

    async def record_attempt(
        self,
        delivery_id: str,
        *,
        delivered: bool,
        status_code: int | None,
        error: str | None,
        next_attempt_at: float | None,
    ) -> Delivery | None:
        """One attempt's outcome: delivered, pending again (``next_attempt_at``) or failed (None)."""

        def op(conn: sqlite3.Connection) -> Delivery | None:
            now = time.time()
            status = DELIVERED if delivered else (PENDING if next_attempt_at is not None else FAILED)
            conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, status = ?, last_status_code = ?, "
                "last_error = ?, next_attempt_at = ?, updated_at = ?, delivered_at = ? WHERE id = ?",
                (
                    status,
                    status_code,
                    error,
                    next_attempt_at,
                    now,
                    now if delivered else None,
                    delivery_id,
                ),
            )
            row = conn.execute(f"{_DELIVERY_SELECT} WHERE id = ?", (delivery_id,)).fetchone()
            return _delivery(row) if row else None

        return await self._write(op)
