"""Redis scripts of the order path: strategy lock, atomic commit, dead letters.

Each is one Lua script so that what must happen together does: the runtime
update, its control message, the order-log row, a follow-up ABORT event and
(when nothing else follows) the XACK are one step, so an entry is never acked
without its runtime state and log row, and a crash between steps leaves the
entry pending for another executor instead of half-written state.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from libs.schema import keys
from libs.schema.codec import dumps

CONTROL_MAXLEN = 100_000
DEAD_MAXLEN = 100_000

_LOCK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'lock_state', 'locked') end
  return 1
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'lock_state', 'free') end
  return 1
end
return 0
"""

# KEYS: runtime, strategy, order_logs, control, orders
# ARGV: run_id, runtime fields (JSON flat list or ''), control JSON or '', row JSON,
#       control maxlen, abort event JSON or '', group, msg id to ack or ''
# Runtime is only written while the same run is loaded: a late event must not
# resurrect the hash of an unloaded run.
_COMMIT = """
if ARGV[2] ~= '' then
  local raw = redis.call('GET', KEYS[2])
  if raw and cjson.decode(raw)['run_id'] == ARGV[1] then
    redis.call('HSET', KEYS[1], unpack(cjson.decode(ARGV[2])))
    if ARGV[3] ~= '' then
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[3])
    end
  end
end
redis.call('XADD', KEYS[3], '*', 'row', ARGV[4])
if ARGV[6] ~= '' then redis.call('XADD', KEYS[5], '*', 'event', ARGV[6]) end
if ARGV[8] ~= '' then redis.call('XACK', KEYS[5], ARGV[7], ARGV[8]) end
return 1
"""

# KEYS: dead stream, source stream; ARGV: raw, reason, msg id, deliveries, group, maxlen
_DEAD_LETTER = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[1], 'reason', ARGV[2],
           'msg_id', ARGV[3], 'deliveries', ARGV[4])
return redis.call('XACK', KEYS[2], ARGV[5], ARGV[3])
"""


class LockTimeout(Exception):
    """The strategy's lock stayed taken for longer than the wait bound."""


class OrderState:
    """The executor's Redis writes, each one script."""

    def __init__(self, redis: Redis, *, lock_ttl_ms: int, lock_wait_s: float) -> None:
        self.redis = redis
        self.lock_ttl_ms, self.lock_wait_s = lock_ttl_ms, lock_wait_s
        self._lock = redis.register_script(_LOCK)
        self._renew = redis.register_script(_RENEW)
        self._unlock = redis.register_script(_UNLOCK)
        self._commit = redis.register_script(_COMMIT)
        self._dead = redis.register_script(_DEAD_LETTER)

    @contextlib.asynccontextmanager
    async def strategy_lock(self, strategy_id: str) -> AsyncIterator[None]:
        """Hold `lock_state:{id}` (renewed while held); raise LockTimeout if it never frees."""
        lock, runtime = keys.lock_key(strategy_id), keys.runtime_key(strategy_id)
        token = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_wait_s
        pause = 0.005
        while not await self._lock(keys=[lock, runtime], args=[token, self.lock_ttl_ms]):
            if loop.time() >= deadline:
                raise LockTimeout(f"lock of {strategy_id} still taken after {self.lock_wait_s}s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
        renewer = asyncio.create_task(self._keep_lock(lock, token), name=f"lock-renew-{strategy_id}")
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            # Compare-and-delete: a lock that expired and was taken by another
            # executor is not ours to release.
            await self._unlock(keys=[lock, runtime], args=[token])

    async def _keep_lock(self, lock: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lock_ttl_ms / 3000)
            await self._renew(keys=[lock], args=[token, self.lock_ttl_ms])

    async def commit(self, *, strategy_id: str, run_id: str, row: bytes, runtime_fields: dict[str, str] | None,
                     control: bytes | None, abort_event: bytes | None, ack_msg_id: str | None) -> None:
        """Write runtime, control message, log row and follow-up event; ack if asked, all at once."""
        flat = [x for pair in (runtime_fields or {}).items() for x in pair]
        await self._commit(
            keys=[keys.runtime_key(strategy_id), keys.strategy_key(strategy_id), keys.ORDER_LOGS_STREAM,
                  keys.CONTROL_STREAM, keys.ORDERS_STREAM],
            args=[run_id, dumps(flat) if flat else b"", control or b"", row, CONTROL_MAXLEN,
                  abort_event or b"", keys.EXECUTORS_GROUP, ack_msg_id or b""],
        )

    async def ack(self, msg_id: str) -> None:
        await self.redis.xack(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, msg_id)

    async def dead_letter(self, msg_id: str, raw: bytes, reason: str, deliveries: int) -> None:
        """Move an entry to `queue:orders:dead` with its reason and ack it, atomically."""
        await self._dead(keys=[keys.ORDERS_DEAD_STREAM, keys.ORDERS_STREAM],
                         args=[raw, reason, msg_id, deliveries, keys.EXECUTORS_GROUP, DEAD_MAXLEN])
