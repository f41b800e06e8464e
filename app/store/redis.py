"""Redis session store: one store shared by several server replicas (redis-py asyncio).

Keys (``P`` = ``settings.redis_prefix``, default ``emotion:``)::

    P session{<id>}          hash   id state source created_at updated_at ended_at metadata(json)
                                    last_seq result_count audio_end emo_n last_result(json)
                                    tenant end_reason heartbeat_at (absent in older hashes)
                                    roles(json) alert_state(json) alert_count
                                    ch:<n>=1  count:<label>=int  psum:<label>=float
    P session{<id>}:results  stream one entry per result, entry id "<seq>-0", field r = result json
    P session{<id>}:alerts   list   one alert json per fired rule, in order (expires with the session)
    P session{<id>}:events   stream "ended" / "deleted" markers that wake long polls
    P sessions               zset   session id scored by updated_at (listing, newest first)
    P sessions:tenant{<t>}   zset   the same for the sessions of tenant <t> only (a tenant's
                                    listing reads its own index, never the others' sessions)
    P sessions:tenant-index  string set once the tenant indexes hold every older session too
    P session{<id>}:lease    string the live stream's lease (owner id, PX ttl): ``app.store.lease``

The id sits between braces, which the session id pattern forbids, so no id can name another
session's keys (the old ``P session:<id>`` layout let ``victim:results`` alias the results stream
of ``victim``). Sessions written by that old layout are adopted on first touch (the scripts, and a
read that finds nothing, ``RENAME`` the old keys to the new ones, TTLs kept) when their id has no
``:``; old sessions whose id contains ``:`` are ambiguous and are not read.

Connections: commands go through a bounded pool that waits (``BlockingConnectionPool``) instead of
failing when all connections are busy; long polls (``XREAD BLOCK``) use a separate pool of their
own (``max_long_polls`` connections, read timeout longer than the longest block), so blocked polls
can never starve writes. A long poll beyond that pool's size raises ``StoreBusy`` (HTTP 503), and
so does a command that waited ``pool_timeout_s`` without getting a connection
(``StorePoolExhausted``, 503 ``store_busy`` with Retry-After, instead of redis-py's bare
``ConnectionError`` that surfaced as a 500).

Sequence numbers: a Lua script (atomic on the server) increments ``last_seq`` in the hash and
XADDs the result with the entry id ``<seq>-0`` together with the aggregate updates, so replicas
appending to one session concurrently get unique, gap-free, ordered numbers. Results are stored
without ``seq``/``session_id``; both are added back from the entry id on read.

Results carry ``role`` and ``received_at`` (``app.store.common.stored_body``). With alert rules, an
append is an optimistic transaction: ``WATCH`` the hash, read ``last_seq``/``roles``/``alert_state``,
evaluate the rules (``app.store.alerts.step``), then ``MULTI`` (the append script, the new state, the
fired alerts) ``EXEC``, retried when another writer (an append, a heartbeat) touched the hash in
between; so an alert is stored exactly when its result is, as in SQLite. Without rules an append is
one ``HGET roles`` and the script.

Long poll: ``XREAD BLOCK`` on the results stream and the events stream at once, so an append by any
replica, or the end/deletion of the session, wakes every waiter within a round trip.

Liveness: a live stream writes ``heartbeat_at`` every few seconds (``heartbeat``); ``sweep`` (run
periodically by every replica, and by ``recover`` at start-up) ends stream sessions whose newest
heartbeat or result is older than ``stream_stale_s`` (their replica died: reason
``server_restart``) and REST sessions idle for ``rest_idle_s`` (reason ``idle``). Sessions of
older hashes without ``heartbeat_at`` are judged by ``updated_at``.

Ended sessions expire after ``ended_ttl_s`` (``EXPIRE`` on their keys; a re-open removes it).
Their index entries are removed by the next listing that meets them.

Tenant indexes: the scripts keep ``P sessions:tenant{<t>}`` beside the global index for sessions
that have an owner (the key is derived in Lua from the hash's ``tenant`` field). Sessions written
before these indexes existed are added once, by the first tenant listing that finds no
``P sessions:tenant-index`` marker (``ZADD NX``: entries the scripts wrote meanwhile are kept).

Stream leases (one live stream per session across replicas): ``leases`` (``app.store.lease``).

Single Redis (or a primary): the scripts touch the global ``sessions`` key and the tenant index
derived from a field, so not Redis Cluster.

Thread-safety: one instance belongs to one event loop (redis-py asyncio connections are bound to
the loop that created them); replicas and processes share data through Redis itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

from redis.asyncio.connection import BlockingConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, WatchError

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
    StoreBusy,
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
from app.store.lease import RedisLeases

# Prelude of every write script (prepended at registration): adopt a session written by the old
# key layout (KEYS[5..7], passed only for ids without ':') when the new hash does not exist.
# RENAME keeps TTLs.
_ADOPT = """
if #KEYS > 4 and redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('RENAME', KEYS[5], KEYS[1])
  if redis.call('EXISTS', KEYS[6]) == 1 then redis.call('RENAME', KEYS[6], KEYS[2]) end
  if redis.call('EXISTS', KEYS[7]) == 1 then redis.call('RENAME', KEYS[7], KEYS[3]) end
end
"""

# Prelude of the scripts that keep the tenant indexes: the index of the session's owner, or false.
_TENANT = """
local function tenant_index()
  local t = redis.call('HGET', KEYS[1], 'tenant')
  if t then return KEYS[4] .. ':tenant{' .. t .. '}' end
  return false
end
"""

# KEYS: hash, results stream, events stream, index zset. ARGV: now, result json, channel, end,
# session id, label ('' = none), then label/probability pairs.
# Returns the new seq, or -1 when the session does not exist.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local seq = redis.call('HINCRBY', KEYS[1], 'last_seq', 1)
redis.call('XADD', KEYS[2], seq .. '-0', 'r', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'result_count', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1], 'last_result', ARGV[2], 'ch:' .. ARGV[3], '1')
local cur = tonumber(redis.call('HGET', KEYS[1], 'audio_end') or '0')
if tonumber(ARGV[4]) > cur then redis.call('HSET', KEYS[1], 'audio_end', ARGV[4]) end
if ARGV[6] ~= '' then
  redis.call('HINCRBY', KEYS[1], 'emo_n', 1)
  redis.call('HINCRBY', KEYS[1], 'count:' .. ARGV[6], 1)
  for i = 7, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], 'psum:' .. ARGV[i], ARGV[i + 1]) end
end
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[5])
local ti = tenant_index()
if ti then redis.call('ZADD', ti, ARGV[1], ARGV[5]) end
return seq
"""

# KEYS: hash, results, events, index. ARGV: now, id, source, metadata json (create only), tenant
# ('' = none: no owner on create, no owner check on re-open).
# Returns 1 when created, 0 when re-opened (metadata is merged by the caller afterwards), -1 when
# the session belongs to another tenant (nothing changed).
_OPEN = """
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'id', ARGV[2], 'state', 'active', 'source', ARGV[3], 'created_at', ARGV[1],
             'updated_at', ARGV[1], 'metadata', ARGV[4], 'last_seq', 0, 'result_count', 0,
             'audio_end', 0, 'emo_n', 0, 'heartbeat_at', ARGV[1])
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'tenant', ARGV[5]) end
  created = 1
else
  if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[5] then return -1 end
  redis.call('HSET', KEYS[1], 'state', 'active', 'updated_at', ARGV[1], 'heartbeat_at', ARGV[1])
  redis.call('HDEL', KEYS[1], 'ended_at', 'end_reason')
end
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[2])
local ti = tenant_index()
if ti then redis.call('ZADD', ti, ARGV[1], ARGV[2]) end
return created
"""

# KEYS: hash, results, events, index. ARGV: now, id, ttl seconds (0 = keep), end reason ('' = none),
# and optionally a cutoff: end only when neither updated_at nor heartbeat_at is newer (sweeps).
_CLOSE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
if ARGV[5] then
  local seen = tonumber(redis.call('HGET', KEYS[1], 'updated_at') or '0')
  local beat = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_at') or '0')
  if seen >= tonumber(ARGV[5]) or beat >= tonumber(ARGV[5]) then return 0 end
end
redis.call('HSET', KEYS[1], 'state', 'ended', 'ended_at', ARGV[1], 'updated_at', ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'end_reason', ARGV[4]) end
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[2])
local ti = tenant_index()
if ti then redis.call('ZADD', ti, ARGV[1], ARGV[2]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 16, '*', 'e', 'ended')
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
redis.call('EXPIRE', KEYS[3], 120)
return 1
"""

# KEYS: hash. ARGV: now.
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'state') == 'active' then redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[1]) end
return 0
"""

# KEYS: hash, results, events, index. ARGV: id.
_DELETE = """
local ti = tenant_index()
if ti then redis.call('ZREM', ti, ARGV[1]) end
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 16, '*', 'e', 'deleted')
redis.call('EXPIRE', KEYS[3], 120)
return existed
"""


class StorePoolExhausted(StoreBusy):
    """Every command connection stayed busy for the pool's whole wait: 503 ``store_busy`` + Retry-After."""

    retry_after: float | None = 2.0


class _CommandPool(BlockingConnectionPool):
    """The command pool: a wait for a free connection that times out is ``StorePoolExhausted``.

    redis-py raises a bare ``ConnectionError("No connection available.")`` caused by the timeout,
    indistinguishable by type from Redis being down; only that case is translated here.
    """

    async def get_connection(self, *args, **kwargs):
        try:
            return await super().get_connection(*args, **kwargs)
        except RedisConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError | TimeoutError):
                raise StorePoolExhausted(
                    f"all {self.max_connections} Redis connections stayed busy for {self.timeout:g} s; "
                    "retry later"
                ) from exc
            raise


def _num(value: str | None, default: float = 0.0) -> float:
    return float(value) if value not in (None, "") else default


# The client is made with decode_responses=True, so every reply is str; redis-py's annotations
# cannot express that (they say bytes | str, or an awaitable-or-value union), hence the casts below.
_Hash = dict[str, str]
_StreamEntries = list[tuple[str, dict[str, str]]]


class RedisStore:
    """``SessionStore`` over Redis; see the module docstring for the key layout."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "emotion:",
        ended_ttl_s: float = 7 * 86400.0,
        client=None,
        max_connections: int = 100,
        max_long_polls: int = 256,
        max_block_s: float = 60.0,
        pool_timeout_s: float = 10.0,
        max_metadata_bytes: int = MAX_METADATA_BYTES,
        alert_rules: list[AlertRule] | None = None,
    ):
        import redis.asyncio as aioredis
        from redis.asyncio.connection import ConnectionPool, parse_url

        self.url = url
        self.alert_rules = list(alert_rules or [])
        self.injected_client = client  # the event bus (app.store.events) uses it too when set
        self.prefix = prefix
        self.ended_ttl_s = ended_ttl_s
        self.max_metadata_bytes = max_metadata_bytes
        self.max_long_polls = max(1, int(max_long_polls))
        self.max_block_s = max(0.001, float(max_block_s))
        self._long_polls = 0  # XREAD BLOCKs in flight (one event loop: a plain counter is enough)
        if client is not None:  # injected client (tests): used for everything
            self._r = self._rb = client
        else:
            # Our options override the URL's query string (from_url would let the URL win).
            opts: dict[str, Any] = {**parse_url(url), "decode_responses": True}  # connection kwargs
            opts.pop("max_connections", None)
            self._r = aioredis.Redis.from_pool(
                _CommandPool(**opts, max_connections=max(1, int(max_connections)), timeout=pool_timeout_s)
            )
            # Blocking reads: a read timeout longer than the longest XREAD BLOCK, and a pool of their
            # own so that waiting polls never hold the connections that writes need.
            self._rb = aioredis.Redis.from_pool(
                ConnectionPool(
                    **{**opts, "socket_timeout": self.max_block_s + 10.0},
                    max_connections=self.max_long_polls,
                )
            )
        self._append = self._r.register_script(_ADOPT + _TENANT + _APPEND)
        self._open = self._r.register_script(_ADOPT + _TENANT + _OPEN)
        self._close = self._r.register_script(_ADOPT + _TENANT + _CLOSE)
        self._delete = self._r.register_script(_ADOPT + _TENANT + _DELETE)
        self._tenant_index_ready = False  # the one-time fill of the tenant indexes is done
        self.leases = RedisLeases(self._r, lambda sid: f"{prefix}session{{{sid}}}:lease")
        self._heartbeat = self._r.register_script(_HEARTBEAT)
        self._adopt_script = self._r.register_script(_ADOPT)

    # --- keys ----------------------------------------------------------------------------------

    def _keys(self, session_id: str) -> list[str]:
        """hash, results, events, index; then the old layout's three keys when they can be adopted."""
        base = f"{self.prefix}session{{{session_id}}}"
        keys = [base, base + ":results", base + ":events", self.prefix + "sessions"]
        if ":" not in session_id:  # the old layout is unambiguous only for such ids
            old = f"{self.prefix}session:{session_id}"
            keys += [old, old + ":results", old + ":events"]
        return keys

    def _tenant_index(self, tenant: str) -> str:
        """The tenant's own index (the scripts derive the same name from KEYS[4])."""
        return f"{self.prefix}sessions:tenant{{{tenant}}}"

    async def _ensure_tenant_index(self) -> None:
        """Once per Redis: add the sessions written before the tenant indexes existed to theirs."""
        if self._tenant_index_ready:
            return
        marker = self.prefix + "sessions:tenant-index"
        if not await self._r.exists(marker):
            index, start, page = self.prefix + "sessions", 0, 500
            while True:
                rows = cast(
                    list[tuple[str, float]],
                    await self._r.zrange(index, start, start + page - 1, withscores=True),
                )
                if not rows:
                    break
                start += page
                pipe = self._r.pipeline(transaction=False)
                for sid, _ in rows:
                    pipe.hget(self._keys(sid)[0], "tenant")
                owners = await pipe.execute()
                pipe = self._r.pipeline(transaction=False)
                for (sid, score), owner in zip(rows, owners, strict=True):
                    if owner:  # NX: an entry the scripts wrote meanwhile is newer; keep it
                        pipe.zadd(self._tenant_index(owner), {sid: score}, nx=True)
                await pipe.execute()
            await self._r.set(marker, "1")
        self._tenant_index_ready = True

    async def _adopt(self, session_id: str) -> bool:
        """Adopt a session of the old key layout; True when one was found (reads that miss call it)."""
        keys = self._keys(session_id)
        if len(keys) <= 4 or not await self._r.exists(keys[4]):
            return False
        await self._adopt_script(keys=keys, args=[])
        return True

    @staticmethod
    def _raw(h: dict[str, str]) -> RawSession:
        counts, psum, channels = {}, {}, []
        for k, v in h.items():
            if k.startswith("count:"):
                counts[k[6:]] = int(v)
            elif k.startswith("psum:"):
                psum[k[5:]] = float(v)
            elif k.startswith("ch:"):
                channels.append(int(k[3:]))
        last_seq = int(h.get("last_seq", 0))
        last = json.loads(h["last_result"]) if h.get("last_result") else None
        return RawSession(
            id=h["id"],
            state=h.get("state", ACTIVE),
            source=h.get("source", "stream"),
            created_at=_num(h.get("created_at")),
            updated_at=_num(h.get("updated_at")),
            ended_at=_num(h["ended_at"]) if h.get("ended_at") else None,
            metadata=json.loads(h.get("metadata") or "{}"),
            channels=channels,
            result_count=int(h.get("result_count", 0)),
            last_seq=last_seq,
            audio_end=_num(h.get("audio_end")),
            emo_n=int(h.get("emo_n", 0)),
            emo_counts=counts,
            emo_psum=psum,
            # The script writes last_result and last_seq together, so this is its number.
            last_result=stamp(last, h["id"], last_seq) if last is not None else None,
            tenant=h.get("tenant") or None,
            end_reason=h.get("end_reason") or None,
            heartbeat_at=_num(h["heartbeat_at"]) if h.get("heartbeat_at") else None,
            roles=load_roles(h.get("roles")),
            alert_count=int(h.get("alert_count", 0) or 0),
        )

    # --- SessionStore ----------------------------------------------------------------------------

    async def open_session(
        self,
        session_id: str,
        metadata: dict[str, Any] | None = None,
        source: str = "stream",
        tenant: str | None = None,
        roles: list[str] | None = None,
    ) -> dict:
        """Create or re-open (see ``SQLiteStore.open_session``: tenant check, metadata cap, roles)."""
        check_source(source)
        keys = self._keys(session_id)
        cap = self.max_metadata_bytes
        first = merged_metadata({}, metadata, cap)  # a new session's metadata, checked against the cap
        if metadata:  # check the merge before changing anything (re-checked under WATCH below)
            old_text = await self._r.hget(keys[0], "metadata")
            merged_metadata(json.loads(old_text or "{}"), metadata, cap)
        created = int(
            await self._open(keys=keys, args=[repr(time.time()), session_id, source, first, tenant or ""])
        )
        if created < 0:
            raise SessionNotFound(session_id)
        await self._r.persist(self._alerts_key(session_id))  # it expires with the session only
        if roles is not None:
            await self._r.hset(keys[0], "roles", dump_roles(roles) or "")
        if not created and metadata:
            # Shallow merge of new metadata keys on re-open; optimistic transaction (WATCH) so a
            # concurrent re-open cannot lose keys.
            async with self._r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(keys[0])
                        old = json.loads(await pipe.hget(keys[0], "metadata") or "{}")
                        pipe.multi()
                        pipe.hset(keys[0], "metadata", merged_metadata(old, metadata, cap))
                        await pipe.execute()
                        break
                    except WatchError:  # someone wrote in between: read again
                        continue
        return session_view(self._raw(cast(_Hash, await self._r.hgetall(keys[0]))))

    async def close_session(self, session_id: str, reason: str | None = None) -> bool:
        """End an active session; True when this call ended it."""
        ended = int(
            await self._close(
                keys=self._keys(session_id),
                args=[repr(time.time()), session_id, int(self.ended_ttl_s), reason or ""],
            )
        )
        if ended:
            await self._expire_alerts(session_id)
        return bool(ended)

    def _alerts_key(self, session_id: str) -> str:
        return self._keys(session_id)[0] + ":alerts"

    async def _expire_alerts(self, session_id: str) -> None:
        """The alerts list expires with its ended session (the close script sets the others' TTL)."""
        if int(self.ended_ttl_s) > 0:
            await self._r.expire(self._alerts_key(session_id), int(self.ended_ttl_s))

    async def heartbeat(self, session_id: str) -> None:
        await self._heartbeat(keys=self._keys(session_id)[:1], args=[repr(time.time())])

    async def sweep(self, rest_idle_s: float = 900.0, stream_stale_s: float = 90.0) -> int:
        """End idle REST sessions and stream sessions of dead replicas (see the module docstring)."""
        return len(await self.sweep_ended(rest_idle_s, stream_stale_s))

    async def sweep_ended(self, rest_idle_s: float = 900.0, stream_stale_s: float = 90.0) -> list[str]:
        """``sweep``, returning the ids of the sessions it ended."""
        index = self.prefix + "sessions"
        now = time.time()
        ended: list[str] = []
        start, page = 0, 500
        while True:
            ids = cast(list[str], await self._r.zrange(index, start, start + page - 1))
            if not ids:
                return ended
            start += page
            pipe = self._r.pipeline(transaction=False)
            for sid in ids:
                pipe.hmget(self._keys(sid)[0], ["state", "source", "updated_at", "heartbeat_at"])
            rows = await pipe.execute()
            for sid, (state, source, updated, beat) in zip(ids, rows, strict=True):
                if state != ACTIVE:
                    continue
                limit_s, reason = (
                    (rest_idle_s, END_IDLE) if source == "rest" else (stream_stale_s, END_RESTART)
                )
                seen = max(_num(updated), _num(beat))
                if limit_s <= 0 or seen >= now - limit_s:
                    continue
                args = [repr(now), sid, int(self.ended_ttl_s), reason, repr(now - limit_s)]
                if int(await self._close(keys=self._keys(sid), args=args)):
                    await self._expire_alerts(sid)
                    ended.append(sid)

    async def recover(self, stream_stale_s: float = 90.0) -> int:
        """At start-up: end the stream sessions of replicas that died (no heartbeat for
        ``stream_stale_s``); live streams of other replicas keep their heartbeat fresh."""
        return len(await self.recover_ended(stream_stale_s))

    async def recover_ended(self, stream_stale_s: float = 90.0) -> list[str]:
        """``recover``, returning the ids of the sessions it ended."""
        return await self.sweep_ended(rest_idle_s=0.0, stream_stale_s=stream_stale_s)

    async def append_result(self, session_id: str, result: dict[str, Any]) -> int:
        return (await self.append(session_id, result)).seq

    @staticmethod
    def _append_args(session_id: str, body: dict[str, Any], now: float) -> list[Any]:
        stats = ResultStats.of(body)
        args: list[Any] = [
            repr(now),
            json.dumps(body),
            stats.channel,
            repr(stats.end),
            session_id,
            stats.label or "",
        ]
        if stats.label is not None:
            for k, p in stats.probabilities.items():
                args += [k, repr(float(p))]
        return args

    async def append(self, session_id: str, result: dict[str, Any]) -> Appended:
        """``append_result`` returning the stored result and the alerts it fired (``Appended``)."""
        if self.alert_rules:
            return await self._append_with_alerts(session_id, result)
        keys = self._keys(session_id)
        roles_text, tenant = cast(list[str | None], await self._r.hmget(keys[0], ["roles", "tenant"]))
        now = time.time()
        body = stored_body(result, load_roles(roles_text), now)
        seq = int(await self._append(keys=keys, args=self._append_args(session_id, body, now)))
        if seq < 0:
            raise SessionNotFound(session_id)
        return Appended(seq=seq, result=stamp(body, session_id, seq), tenant=tenant or None)

    async def _append_with_alerts(self, session_id: str, result: dict[str, Any]) -> Appended:
        keys = self._keys(session_id)
        alerts_key = self._alerts_key(session_id)
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(keys[0])
                    fields = ["id", "last_seq", "roles", "alert_state", "tenant"]
                    sid, last_seq, roles_text, state_text, tenant = await pipe.hmget(keys[0], fields)
                    if sid is None:
                        await pipe.reset()
                        if await self._adopt(session_id):
                            continue  # an old-layout session, renamed: read it again
                        raise SessionNotFound(session_id)
                    now = time.time()
                    seq = int(last_seq or 0) + 1
                    body = stored_body(result, load_roles(roles_text), now)
                    stored = stamp(body, session_id, seq)
                    state = json.loads(state_text) if state_text else {}
                    new_state, alerts = step(self.alert_rules, state, stored, session_id, iso(now) or "")
                    pipe.multi()
                    await self._append(keys=keys, args=self._append_args(session_id, body, now), client=pipe)
                    if new_state != state:
                        pipe.hset(keys[0], "alert_state", json.dumps(new_state))
                    if alerts:
                        pipe.rpush(alerts_key, *[json.dumps(a) for a in alerts])
                        pipe.hincrby(keys[0], "alert_count", len(alerts))
                    replies = await pipe.execute()
                    break
                except WatchError:  # another writer touched the session: evaluate again
                    continue
        if (
            int(replies[0]) != seq
        ):  # cannot happen while the hash is watched; never store a wrong seq silently
            raise RuntimeError(f"session {session_id}: appended as {replies[0]}, expected {seq}")
        return Appended(seq=seq, result=stored, alerts=alerts, tenant=tenant or None)

    async def alerts(self, session_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        """Alerts of the session whose result ``seq > after``, in order (empty for unknown ids)."""
        raw = cast(list[str], await self._r.lrange(self._alerts_key(session_id), 0, -1))
        out = [a for a in (json.loads(x) for x in raw) if int(a.get("seq", 0)) > int(after)]
        return out[: max(1, int(limit))]

    async def ping(self) -> None:
        """Cheap health check (``/readyz``): PING on the command pool."""
        await self._r.ping()

    async def get_session(self, session_id: str) -> dict | None:
        h = cast(_Hash, await self._r.hgetall(self._keys(session_id)[0]))
        if not h and await self._adopt(session_id):
            h = cast(_Hash, await self._r.hgetall(self._keys(session_id)[0]))
        return session_view(self._raw(h)) if h else None

    async def list_sessions(
        self, state: str | None = None, limit: int = 100, tenant: str | None = None
    ) -> list[dict]:
        check_state(state)
        limit = max(0, int(limit))
        index = self.prefix + "sessions"
        if tenant is not None:  # the tenant's own index: its listing never reads other tenants' sessions
            await self._ensure_tenant_index()
            index = self._tenant_index(tenant)
        out: list[dict] = []
        now = time.time()
        page, start = 200, 0
        # Bounded scan, newest first: a state filter may skip entries, expired ones are cleaned up.
        while len(out) < limit and start < 100_000:
            ids = cast(list[str], await self._r.zrevrange(index, start, start + page - 1))
            if not ids:
                break
            start += page
            pipe = self._r.pipeline(transaction=False)
            for sid in ids:
                pipe.hgetall(self._keys(sid)[0])
            hashes = await pipe.execute()
            for i, (sid, h) in enumerate(zip(ids, hashes, strict=True)):
                if not h and await self._adopt(sid):  # a session of the old key layout
                    hashes[i] = await self._r.hgetall(self._keys(sid)[0])
            stale = [sid for sid, h in zip(ids, hashes, strict=True) if not h]
            if stale:
                await self._r.zrem(index, *stale)
                start -= len(stale)
            for h in hashes:
                if (
                    h
                    and (state is None or h.get("state") == state)
                    and (tenant is None or h.get("tenant") == tenant)
                ):
                    out.append(session_view(self._raw(h), now))
                    if len(out) >= limit:
                        break
        return out

    async def results(
        self, session_id: str, after: int = 0, wait_s: float = 0.0, limit: int = 1000
    ) -> list[dict]:
        h_key, r_key, e_key = self._keys(session_id)[:3]
        limit = max(1, int(limit))
        after = max(0, int(after))
        for attempt in range(2):
            pipe = self._r.pipeline(transaction=True)
            pipe.hget(h_key, "state")
            pipe.xrange(r_key, f"{after + 1}-0", "+", count=limit)
            pipe.xrevrange(e_key, "+", "-", count=1)
            state, entries, last_event = await pipe.execute()
            if state is not None or attempt or not await self._adopt(session_id):
                break
        if entries or state != ACTIVE or wait_s <= 0:
            return self._decode(session_id, entries)
        # Block for a newer result or an end/delete marker. The marker id read in the same
        # transaction closes the race with a close between the check and the wait.
        event_id = last_event[0][0] if last_event else "0-0"
        block_ms = max(1, int(min(wait_s, self.max_block_s) * 1000))
        if self._long_polls >= self.max_long_polls:
            raise StoreBusy(f"{self._long_polls} long polls are waiting already; retry later")
        self._long_polls += 1
        try:
            got = cast(
                "list[tuple[str, _StreamEntries]] | None",
                await self._rb.xread({r_key: f"{after}-0", e_key: event_id}, count=limit, block=block_ms),
            )
        except MaxConnectionsError as exc:  # pool shared with another store instance: same answer
            raise StoreBusy("every long-poll connection is in use; retry later") from exc
        finally:
            self._long_polls -= 1
        for stream, stream_entries in got or []:
            if stream == r_key:
                return self._decode(session_id, stream_entries)
        # Woken by a marker (or timed out): answer with whatever exists now.
        entries = cast(_StreamEntries, await self._r.xrange(r_key, f"{after + 1}-0", "+", count=limit))
        return self._decode(session_id, entries)

    @staticmethod
    def _decode(session_id: str, entries: _StreamEntries) -> list[dict]:
        return [
            stamp(json.loads(fields["r"]), session_id, int(eid.split("-", 1)[0])) for eid, fields in entries
        ]

    async def delete_session(self, session_id: str) -> bool:
        await self._r.delete(self._alerts_key(session_id))
        return bool(await self._delete(keys=self._keys(session_id), args=[session_id]))

    async def close(self) -> None:
        await self._r.aclose()
        if self._rb is not self._r:
            await self._rb.aclose()


__all__ = ["ENDED", "RedisStore", "StorePoolExhausted"]
