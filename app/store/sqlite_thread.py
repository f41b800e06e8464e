"""``SQLiteThread``: one dedicated thread that owns one SQLite connection.

The session store (``app.store.sqlite``) and the job store (``app.jobs.store``) both keep their
SQLite file this way: sqlite3 connections must not be used from several threads at once, so every
call runs on the one thread (``run``), writes inside ``BEGIN IMMEDIATE ... COMMIT`` (``tx``), and
the connection is opened on first use by the owner's ``connect`` (which creates the schema).

Thread-safety: ``run`` and ``close`` are called from the event loop; ``conn`` and ``tx`` only on
the owned thread (from inside a function passed to ``run``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class SQLiteThread:
    def __init__(self, connect: Callable[[], sqlite3.Connection], thread_name: str, what: str):
        self._connect = connect
        self._what = what  # "the session store": for the error after close
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the owned thread."""
        if self._closed:
            raise RuntimeError(f"{self._what} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def conn(self) -> sqlite3.Connection:
        """The connection, opened on first use (on the owned thread)."""
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def tx(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(conn, *args)`` inside BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn(conn, *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return out

    async def close(self) -> None:
        if self._closed:
            return

        def op() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self.run(op)
        self._closed = True
        self._executor.shutdown(wait=True)
