"""The strategy lock `lock_state:{id}`: one holder at a time works on a strategy's run.

The executor holds it while it handles an event of the strategy (and while
reconciliation rebuilds its runtime); the API holds it while it stops the run
(a stop, the kill switch). Whoever holds it is the only one placing an order
for the run or unloading it, so a stop never overlaps an order in flight.

The lock's value is an owner token (`<role>:<process>:<n>`), so only its holder
can renew or release it (compare-and-extend, compare-and-delete). Its TTL frees
the lock of a holder that crashed; a live holder renews it every third of the
TTL for as long as it holds it. A lease whose renewal found the lock not its
own, or that went a whole TTL without a successful renewal, is lost:
`Lease.ensure_held()` raises LockLost and the holder changes nothing more
under it.

`runtime:{id}.lock_state` mirrors the lock for whoever reads the runtime
hash: the script that takes the lock writes `locked`, the one that releases
it writes `free`, in the same step and only if the hash exists (a lock must
never create the runtime of an unloaded run). Renewal leaves it alone. A
holder that crashed leaves `locked` behind until the lock is next taken and
released (an expiring key runs no script). A script that writes a whole
runtime hash (a run's load) sets the field from the lock key (MIRROR_LOCK_FN).

The executor's hot path takes the lock and reads its state in one script, and
commits and releases in another: those scripts compose the Lua functions
TAKE_LOCK_FN and RELEASE_LOCK_FN defined here, so that the key, the value and
the `lock_state` writes are the same for every holder.

Redis Cluster: a strategy's lock and runtime keys carry its partition's hash
tag (`keys.lock_key`, `keys.runtime_key`), so each script here is one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.schema import keys
from libs.schema.models import LockState
from libs.service.backoff import Backoff, backoff_delay
from libs.service.logging import get_logger
from libs.service.scripts import script_for

_log = get_logger("lock")

# Lua fragments (no KEYS/ARGV of their own): put them after a script's header.
TAKE_LOCK_FN = f"""
-- take_lock(lock, runtime, token, ttl ms) -> false if held by anyone, else the runtime's HGETALL as it reads
-- once taken (empty if not loaded; if loaded, marked locked): the read that tells whether it exists is
-- the caller's read of it too
local function take_lock(lock, runtime, token, ttl)
  if not redis.call('SET', lock, token, 'NX', 'PX', ttl) then return false end
  local flat = redis.call('HGETALL', runtime)
  if #flat == 0 then return flat end
  redis.call('HSET', runtime, 'lock_state', '{LockState.locked.value}')
  for i = 1, #flat, 2 do
    if flat[i] == 'lock_state' then
      flat[i + 1] = '{LockState.locked.value}'
      return flat
    end
  end
  flat[#flat + 1] = 'lock_state'
  flat[#flat + 1] = '{LockState.locked.value}'
  return flat
end
"""

RELEASE_LOCK_FN = f"""
-- release_lock(lock, runtime, token, fields) -> 1 if released (runtime, if loaded, marked free), 0 if not the
-- token's (expired or taken over: left to its holder); token '' releases nothing. `fields` (optional): a
-- flat list of runtime fields the caller writes in the same step; they are written here, in one HSET
-- with the lock_state (so the runtime needs no existence check: the caller writes it anyway)
local function release_lock(lock, runtime, token, fields)
  local released = token ~= '' and redis.call('GET', lock) == token
  if released then redis.call('DEL', lock) end
  if fields then
    if released then
      fields[#fields + 1] = 'lock_state'
      fields[#fields + 1] = '{LockState.free.value}'
    end
    redis.call('HSET', runtime, unpack(fields))
  elseif released and redis.call('EXISTS', runtime) == 1 then
    redis.call('HSET', runtime, 'lock_state', '{LockState.free.value}')
  end
  return released and 1 or 0
end
"""

MIRROR_LOCK_FN = f"""
-- mirror_lock(lock, runtime): set the runtime's lock_state from the lock key; for scripts that
-- (re)write a whole runtime hash (a load), which may run while someone holds the lock
local function mirror_lock(lock, runtime)
  local held = redis.call('EXISTS', lock) == 1
  redis.call('HSET', runtime, 'lock_state', held and '{LockState.locked.value}' or '{LockState.free.value}')
end
"""

ACQUIRE = """
-- KEYS: [1] lock_state:{id} (string), [2] runtime:{id} (hash)
-- ARGV: [1] owner token, [2] TTL ms
-- Returns: 1 if taken (runtime's lock_state set to locked if the hash exists), 0 if held by anyone
""" + TAKE_LOCK_FN + """
if take_lock(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return 1 end
return 0
"""

RENEW = """
-- KEYS: [1] lock_state:{id} (string)
-- ARGV: [1] owner token, [2] TTL ms
-- Returns: 1 if the lock is the token's and its TTL was reset, 0 if not (lost; nothing changed)
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE = """
-- KEYS: [1] lock_state:{id} (string), [2] runtime:{id} (hash)
-- ARGV: [1] owner token
-- Returns: 1 if released (runtime's lock_state set to free if the hash exists), 0 if not the token's
""" + RELEASE_LOCK_FN + """
return release_lock(KEYS[1], KEYS[2], ARGV[1])
"""


class LockTimeout(Exception):
    """The strategy's lock stayed taken for longer than the wait bound."""


class LockLost(Exception):
    """The strategy's lock expired or was taken over while held: change nothing more under it."""


@dataclass
class Lease:
    """One holding of a strategy's lock, by its owner token."""

    strategy_id: str
    token: str
    # Event-loop time until which the lock is surely still ours: when the last successful
    # take or renewal was sent, plus the TTL.
    valid_until: float = float("inf")
    released: bool = False
    lost: bool = False  # set once the lock is known to be no longer ours

    def ensure_held(self) -> None:
        """Raise LockLost if the lock was lost or may have expired (checked right before acting under it)."""
        if not self.lost and asyncio.get_running_loop().time() >= self.valid_until:
            self.lost = True
        if self.lost:
            raise LockLost(f"lock of {self.strategy_id} lost while held")


class StrategyLocks:
    """Take, keep renewed and release strategy locks on one Redis client, for one kind of holder."""

    def __init__(self, redis: Redis, *, role: str, ttl_ms: int, wait_s: float) -> None:
        self.redis, self.role = redis, role
        self.ttl_ms, self.wait_s = ttl_ms, wait_s
        self._acquire = script_for(redis, ACQUIRE)
        self._renew = script_for(redis, RENEW)
        self._release = script_for(redis, RELEASE)
        # Owner tokens: a random per-process part and a counter (unique across
        # processes and hosts without an os.urandom call per lock).
        self._token_prefix = f"{role}:{secrets.token_hex(8)}:"
        self._token_seq = itertools.count()

    def new_token(self) -> str:
        """Return a fresh owner token: the lock's value while this holder has it."""
        return f"{self._token_prefix}{next(self._token_seq)}"

    async def take(self, lease: Lease, attempt: Callable[[], Awaitable[Any]] | None = None, *,
                   wait_s: float | None = None) -> Any:
        """Take the lock for `lease`, waiting up to `wait_s` for its holder; return the taking script's reply.

        `attempt` is a script that takes the lock with TAKE_LOCK_FN (and may read
        in the same step), answering a falsy reply while the lock is held by anyone;
        by default ACQUIRE. Raise LockTimeout if it never frees.
        """
        loop = asyncio.get_running_loop()
        lock, runtime = keys.lock_key(lease.strategy_id), keys.runtime_key(lease.strategy_id)
        if attempt is None:
            async def attempt() -> Any:
                return await self._acquire(keys=[lock, runtime], args=[lease.token, self.ttl_ms])
        wait = self.wait_s if wait_s is None else wait_s
        deadline = loop.time() + wait
        backoff = Backoff(base=0.005, cap=0.2)
        while True:
            sent = loop.time()
            if reply := await attempt():
                lease.valid_until = sent + self.ttl_ms / 1000
                return reply
            if loop.time() >= deadline:
                raise LockTimeout(f"lock of {lease.strategy_id} still taken after {wait}s")
            await asyncio.sleep(backoff.next())

    @contextlib.asynccontextmanager
    async def hold(self, strategy_id: str, *, wait_s: float | None = None) -> AsyncIterator[Lease]:
        """Hold the strategy's lock for the block, renewed; raise LockTimeout if it never frees."""
        lease = Lease(strategy_id, self.new_token())
        await self.take(lease, wait_s=wait_s)
        async with self.keep(lease):
            yield lease

    @contextlib.asynccontextmanager
    async def keep(self, lease: Lease) -> AsyncIterator[None]:
        """Renew a taken lease for the block, then release it (unless already released)."""
        # The first renewal is due a third of the TTL after the take: a timer starts the
        # renewing task then, so the common holding (an order, well under that) costs a
        # timer handle rather than a task created, cancelled and awaited.
        renewer: asyncio.Task[None] | None = None

        def start() -> None:
            nonlocal renewer
            renewer = asyncio.create_task(self._renew_until_lost(lease, first_pause=0.0),
                                          name=f"lock-renew-{lease.strategy_id}")

        timer = asyncio.get_running_loop().call_later(self.ttl_ms / 3000, start)
        try:
            yield
        finally:
            timer.cancel()
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            if not lease.released:
                await self.release(lease)

    async def release(self, lease: Lease) -> bool:
        """Release the lease's lock if it is still its own; return whether it was."""
        lease.released = True
        return bool(await self._release(keys=[keys.lock_key(lease.strategy_id), keys.runtime_key(lease.strategy_id)],
                                        args=[lease.token]))

    async def _renew_until_lost(self, lease: Lease, first_pause: float | None = None) -> None:
        # A Redis error must not end renewal silently (the lock would expire with work in
        # flight): retry with a short backoff. Once the lock is surely gone (the
        # compare-and-extend says not ours, or no renewal for a whole TTL), mark the lease
        # lost so that the holder changes nothing more under it.
        loop = asyncio.get_running_loop()
        lock = keys.lock_key(lease.strategy_id)
        ttl_s = self.ttl_ms / 1000
        pause, failures = ttl_s / 3 if first_pause is None else first_pause, 0
        while True:
            await asyncio.sleep(pause)
            sent = loop.time()
            try:
                ours = await self._renew(keys=[lock], args=[lease.token, self.ttl_ms])
            except RedisError as error:
                if sent < lease.valid_until:
                    failures += 1
                    pause = backoff_delay(failures, base=0.04, cap=ttl_s / 10)
                    _log.warning("lock renewal failed; retrying", strategy_id=lease.strategy_id, holder=self.role,
                                 error=str(error))
                    continue
                ours = 0
            if not ours:
                lease.lost = True
                _log.error("strategy lock lost while held; nothing more is done under it",
                           strategy_id=lease.strategy_id, holder=self.role)
                return
            lease.valid_until = sent + ttl_s
            pause, failures = ttl_s / 3, 0
