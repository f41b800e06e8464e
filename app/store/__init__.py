"""Session stores: ``open_store(settings)`` picks the backend named by ``settings.store``.

Construction does no I/O (SQLite opens its file on first use, redis-py connects lazily), so
``open_store`` may be called at import or app-creation time; call ``await store.close()`` on
shutdown.
"""

from __future__ import annotations

from app.store.base import SessionStore
from app.store.common import Appended, MetadataTooLarge, SessionNotFound, StoreBusy


def open_store(settings=None) -> SessionStore:
    from app.settings import get_settings

    s = settings or get_settings()
    kind = (s.store or "sqlite").lower()
    if kind == "sqlite":
        from app.store.sqlite import SQLiteStore

        return SQLiteStore(
            s.sqlite_path,
            ended_ttl_s=s.store_ended_ttl_s,
            max_metadata_bytes=s.store_max_metadata_bytes,
            alert_rules=s.alert_rules,
        )
    if kind == "redis":
        from app.store.redis import RedisStore

        return RedisStore(
            s.redis_url,
            prefix=s.redis_prefix,
            ended_ttl_s=s.store_ended_ttl_s,
            max_connections=s.redis_max_connections,
            max_long_polls=s.redis_max_long_polls,
            max_block_s=s.sessions_max_wait_s,
            max_metadata_bytes=s.store_max_metadata_bytes,
            alert_rules=s.alert_rules,
        )
    raise ValueError(f"unknown session store {s.store!r}: expected sqlite or redis")


__all__ = ["Appended", "MetadataTooLarge", "SessionNotFound", "SessionStore", "StoreBusy", "open_store"]
