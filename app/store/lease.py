"""Stream leases: at most one live WebSocket stream per session, across every replica.

A stream takes its session's lease before it opens the session and keeps it while it runs:

* ``acquire(session_id, owner, ttl_s)``: granted when nobody holds the lease, or when the holder's
  lease has expired (its replica died or stopped renewing: a *stale* lease is taken over);
  otherwise refused with the holder and the time left until its lease expires (the WebSocket
  endpoint closes 4009 ``session_busy`` with that as ``retry_after_s``).
* ``renew(session_id, owner, ttl_s)``: extends the lease by ``ttl_s``; False when ``owner`` no
  longer holds it (it expired and another stream took it over). The stream's heartbeat renews it
  every ``ttl_s / 3``.
* ``release(session_id, owner)``: compare-and-delete, so a stream that lost its lease never
  deletes its successor's.

``owner`` is unique per connection (``new_owner()``: host, process id and a random part), so the
holder of a lease can be told from any other stream, even on the same replica.

Backends:

* ``RedisLeases`` (``RedisStore.leases``): ``SET <P>session{<id>}:lease <owner> NX PX <ttl>``;
  renewal and release are Lua compare-and-set scripts (atomic on the server). The key shares the
  session's hash tag and prefix; Redis expires it by itself, so a replica killed with ``kill -9``
  leaves a lease that frees itself ``ttl_s`` after its last renewal.
* ``LocalLeases``: the same rules in process memory, for the SQLite store (one process serves a
  SQLite file) and for servers without a store; ``leases_of(store)`` picks it for every store that
  has no ``leases`` of its own.

Thread-safety: ``LocalLeases`` is guarded by a lock (any thread); ``RedisLeases`` belongs to the
event loop of its Redis client, like ``RedisStore``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol, cast

REPLICA_ID = f"{socket.gethostname()}:{os.getpid()}"  # this process, in lease owners and logs


def new_owner() -> str:
    """A lease owner id unique to one stream connection: ``<host>:<pid>:<random>``."""
    return f"{REPLICA_ID}:{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class LeaseGrant:
    """The answer to ``acquire``: granted, or who holds the lease and for how long still."""

    acquired: bool
    holder: str | None = None  # the current holder when refused
    expires_in_s: float = 0.0  # refused: time until the holder's lease expires unless renewed


class StreamLeases(Protocol):
    async def acquire(self, session_id: str, owner: str, ttl_s: float) -> LeaseGrant: ...

    async def renew(self, session_id: str, owner: str, ttl_s: float) -> bool: ...

    async def release(self, session_id: str, owner: str) -> bool: ...


class LocalLeases:
    """In-process leases with the same rules as ``RedisLeases`` (monotonic clock)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}  # session id -> (owner, expires at)

    async def acquire(self, session_id: str, owner: str, ttl_s: float) -> LeaseGrant:
        now = self._clock()
        with self._lock:
            held = self._held.get(session_id)
            if held is not None and held[1] > now and held[0] != owner:
                return LeaseGrant(False, held[0], round(held[1] - now, 3))
            self._held[session_id] = (owner, now + ttl_s)  # free, expired (stale) or ours
            return LeaseGrant(True)

    async def renew(self, session_id: str, owner: str, ttl_s: float) -> bool:
        now = self._clock()
        with self._lock:
            held = self._held.get(session_id)
            if held is not None and held[0] != owner and held[1] > now:
                return False  # taken over
            # ours, or expired without anybody taking it over (the owner was only slow): keep it
            self._held[session_id] = (owner, now + ttl_s)
            return True

    async def release(self, session_id: str, owner: str) -> bool:
        with self._lock:
            held = self._held.get(session_id)
            if held is None or held[0] != owner:
                return False
            del self._held[session_id]
            return True

    def holder(self, session_id: str) -> str | None:
        """The live holder (tests, diagnostics)."""
        with self._lock:
            held = self._held.get(session_id)
            return held[0] if held is not None and held[1] > self._clock() else None


# KEYS: lease. ARGV: owner, ttl ms. Returns {1} when granted, else {0, holder, pttl ms}.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return {1} end
return {0, holder or '', redis.call('PTTL', KEYS[1])}
"""

# KEYS: lease. ARGV: owner, ttl ms. 1 when renewed; 0 when someone else holds it. A lease that
# expired while nobody took it is taken again (SET NX): its owner was only slow, not replaced.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if holder then return 0 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: lease. ARGV: owner. Compare-and-delete.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLeases:
    """Leases in Redis (see the module docstring); ``key_of`` names a session's lease key."""

    def __init__(self, client, key_of) -> None:
        self._key_of = key_of
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def _ms(ttl_s: float) -> int:
        return max(1, int(ttl_s * 1000))

    async def acquire(self, session_id: str, owner: str, ttl_s: float) -> LeaseGrant:
        got = cast(
            list[Any], await self._acquire(keys=[self._key_of(session_id)], args=[owner, self._ms(ttl_s)])
        )
        if int(got[0]) == 1:
            return LeaseGrant(True)
        pttl = int(got[2]) if len(got) > 2 else 0
        return LeaseGrant(False, str(got[1]) or None, round(max(0, pttl) / 1000.0, 3))

    async def renew(self, session_id: str, owner: str, ttl_s: float) -> bool:
        return bool(int(await self._renew(keys=[self._key_of(session_id)], args=[owner, self._ms(ttl_s)])))

    async def release(self, session_id: str, owner: str) -> bool:
        return bool(int(await self._release(keys=[self._key_of(session_id)], args=[owner])))


_PROCESS_LEASES = LocalLeases()


def leases_of(store) -> StreamLeases:
    """The store's own leases (Redis: shared by the replicas), else this process's."""
    leases = getattr(store, "leases", None)
    return cast(StreamLeases, leases) if leases is not None else _PROCESS_LEASES


@dataclass
class SessionLease:
    """One stream's hold on its session: ``renew`` from the heartbeat, ``release`` at the end."""

    leases: StreamLeases
    session_id: str
    owner: str
    ttl_s: float
    lost: bool = False

    async def acquire(self) -> LeaseGrant:
        return await self.leases.acquire(self.session_id, self.owner, self.ttl_s)

    async def renew(self) -> bool:
        """False (and ``lost`` set) once another stream holds the lease."""
        if self.lost:
            return False
        if not await self.leases.renew(self.session_id, self.owner, self.ttl_s):
            self.lost = True
        return not self.lost

    async def release(self) -> bool:
        return await self.leases.release(self.session_id, self.owner)
