"""Keep each Kite api_key under its order rate, across every executor replica.

One Lua script per attempt over a ZSET log of order times at
`keys.order_rate_key(fp)`: drop times older than the window, and take a slot
if fewer than `limit` remain, else answer how long until the oldest leaves.
A rolling window rather than a refilling token bucket, because Kite counts
orders per rolling second: a bucket of 10 refilled at 10/s lets 19 orders
into one second and the broker answers 429. The window is a little longer
than a second (setting) to absorb network skew between here and the broker.
Redis' clock (TIME) is used, so replicas on different hosts agree.

An exit passes the key of its exit-attempt marker: the script sets it in the
same step as it grants the slot, i.e. right before the order is sent, so a
later exit event looks the shared exit tag up first (one round trip, not two).
In a Redis Cluster the marker (the strategy's partition) and the rate key (the
account's) may be in different slots: then the marker is SET right after the
slot is granted, still before the order is sent; a crash in between wastes a
slot and sends nothing, so the marker still precedes every exit order.

A slot may also be taken inside the strategy's lock-and-read script (a new
run's first entry, a plain exit: the orders sent without a tag lookup), saving
a round trip. The window only
bounds orders at the broker if each order is sent soon after its grant: with
grant-to-send delays in [0, D], any second at the broker sees orders granted
within 1000 ms + D (+ network skew), so D must stay inside the window's margin
over Kite's second. Such a slot is therefore used only while fresh (sent within
half the margin, `fresh_s`, 50 ms with the default 1100 ms window); a stale one
is given back and a new one taken in one step (`acquire(replace=...)`), so a
late send costs the separate round trip it would have cost anyway and never a
slot. A slot taken for an event that then sends nothing (a halt, an
order found by its tag) is wasted: one order fewer in that window, never more.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from libs.schema import keys
from services.executor import metrics

# A Lua fragment (no KEYS/ARGV of its own): put it after a script's header.
# Also used by the strategy-lock script (services.executor.state) for the exit fast path.
TAKE_SLOT_FN = """
-- take_slot(rate key, limit, window ms, member) -> 0 if a slot was taken, else ms until one frees.
-- Times that left the window are trimmed only when the log looks full: fewer than `limit` times in
-- all means fewer than `limit` in the window, so an account below its limit costs no trim.
local function take_slot(key, limit, window, member)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local count = redis.call('ZCARD', key)
  if count >= limit then
    count = count - redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  end
  if count < limit then
    redis.call('ZADD', key, now, now .. ':' .. member)
    redis.call('PEXPIRE', key, window)
    return 0
  end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
"""

_TAKE_SLOT = """
-- KEYS: [1] ratelimit:orders:{fp} (zset), [2] exit:attempted:{id}:{run_id} (string, optional)
-- ARGV: [1] limit, [2] window ms, [3] slot member, [4] marker TTL s, [5] member of an unused slot of
--       this caller to give back first, or '' (optional)
-- Returns: 0 if a slot was taken (and the marker set), else ms until one frees
""" + TAKE_SLOT_FN + """
if ARGV[5] and ARGV[5] ~= '' then
  local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '+inf')
  for _, m in ipairs(gone) do
    if string.sub(m, -#ARGV[5] - 1) == ':' .. ARGV[5] then redis.call('ZREM', KEYS[1], m) end
  end
end
local wait = take_slot(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
if wait == 0 and KEYS[2] then redis.call('SET', KEYS[2], '1', 'EX', ARGV[4]) end
return wait
"""


KITE_WINDOW_MS = 1000  # Kite counts orders per rolling second


@dataclass(frozen=True)
class TakenSlot:
    """An order slot taken inside another script (with the strategy's lock), not used yet."""

    member: str  # the member it was asked for with (stored as `<ms>:<member>`)
    sent: float  # event-loop time the taking script was sent: the grant came after it


class RateLimitTimeout(Exception):
    """No order slot came free within the allowed wait."""


class OrderRateLimiter:
    """Wait for an order slot of one api_key fingerprint."""

    def __init__(self, redis: Redis, *, limit: int, window_ms: int, max_wait_s: float) -> None:
        self._redis = redis
        self._script = redis.register_script(_TAKE_SLOT)
        self.limit, self.window_ms, self.max_wait_s = limit, window_ms, max_wait_s
        # Slot members only need to be unique: a random per-process prefix and a counter.
        self._prefix = secrets.token_hex(8)
        self._seq = itertools.count()
        # How long after its grant a slot may still be used: half the window's margin
        # over Kite's second (the other half absorbs network skew).
        self.fresh_s = max(0, window_ms - KITE_WINDOW_MS) / 2000

    def member(self) -> str:
        """Return a new unique slot member."""
        return f"{self._prefix}{next(self._seq)}"

    def slot_request(self, api_key_fp: str) -> tuple[str, list[str | int]]:
        """Return (rate key, [limit, window ms, member]) for a slot taken inside another script."""
        return keys.order_rate_key(api_key_fp), [self.limit, self.window_ms, self.member()]

    def fresh(self, slot: TakenSlot) -> bool:
        """Return whether an order sent now under `slot` keeps the window's bound (see the module doc)."""
        return asyncio.get_running_loop().time() - slot.sent <= self.fresh_s

    async def acquire(self, api_key_fp: str, *, mark: tuple[str, int] | None = None,
                      replace: TakenSlot | None = None) -> float:
        """Take one slot, waiting as needed; return the seconds waited.

        `mark` = (key, ttl_s): SET that key in the same step as the slot is granted.
        `replace`: an unused slot of this caller that went stale, given back in the
        step that takes the new one.
        """
        started = time.monotonic()
        deadline = started + self.max_wait_s
        script_keys = [keys.order_rate_key(api_key_fp)]
        ttl = 0
        separate_mark = mark is not None and keys.hash_slot(mark[0]) != keys.hash_slot(script_keys[0])
        if mark is not None and not separate_mark:
            script_keys.append(mark[0])
            ttl = mark[1]
        while True:
            wait_ms = int(await self._script(keys=script_keys, args=[self.limit, self.window_ms, self.member(), ttl,
                                                                     replace.member if replace else ""]))
            now = time.monotonic()
            if wait_ms == 0:
                if separate_mark:
                    await self._redis.set(mark[0], "1", ex=mark[1])
                waited = now - started
                metrics.RATE_WAIT.observe(waited)
                return waited
            if now + wait_ms / 1000 > deadline:
                raise RateLimitTimeout(f"no order slot for {api_key_fp} within {self.max_wait_s}s")
            await asyncio.sleep(wait_ms / 1000)
