"""Redis scripts of the order path: lock-and-read, atomic commit, dead letters.

Each is one Lua script so that what must happen together does: the runtime
update, its control message, the order-log row, a follow-up ABORT event and
(when nothing else follows) the XACK are one step, so an entry is never acked
without its runtime state and log row, and a crash between steps leaves the
entry pending for another executor instead of half-written state.

Round trips are what the order path waits on, so the scripts also carry the
reads and the release: taking the lock returns, in the same step, everything
the state machine reads under it (config, runtime, the exit-attempt marker and,
when the owner is known, the credential ciphertexts), and the commit that acks
also releases the lock (compare-and-delete). The lock itself (its value,
renewal, release and `runtime:{id}.lock_state`) is `libs.trading.lock`'s:
these scripts compose its Lua functions, and the executor holds the lock
through its StrategyLocks.

Redis Cluster: every script touches one hash slot. A strategy's keys and the
streams its scripts write (its partition's `queue:orders`, `queue:order_logs`,
`control:strategies`, dead letters) share the partition's hash tag, and every
event of a strategy is in its partition's stream, so the commit stays one
atomic step. The user's credentials and the account's rate-limit key have
their own partitions: they join the lock-and-read step only when their tag is
the strategy's (always with N = 1); otherwise the handler reads them in a
separate round trip, as it does when it does not know the owner yet.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from libs.schema import keys
from libs.schema.codec import dumps
from libs.trading.lock import RELEASE_LOCK_FN, TAKE_LOCK_FN, Lease, LockLost, LockTimeout, StrategyLocks
from services.executor.ratelimit import TAKE_SLOT_FN, TakenSlot

__all__ = ["CONTROL_MAXLEN", "DEAD_MAXLEN", "Held", "LockLost", "LockTimeout", "OrderState"]

CONTROL_MAXLEN = keys.CONTROL_MAXLEN
DEAD_MAXLEN = keys.DEAD_MAXLEN

# The slot is only taken for an order sent without a tag lookup: an exit of the loaded
# run with position bought and no earlier exit attempt (the exit marker is set with it),
# or the entry that deleted the run's unsent-entry key (position none). The handler's
# state machine still decides; if it does not send, a slot is wasted (one order less in
# that window, never one more) and an exit's marker makes a later exit look the tag up
# (safe side). The slot is used only while fresh (services.executor.ratelimit). An entry
# that must look first takes none here: under load its lookup outlasted the freshness
# bound (measured: two in three went stale; docs/design.md).
# The intent marker is the listener's stop-loss marker or the API's square-off marker
# (the proof that such an exit was asked for; see services.executor.handler); an entry
# (BUY or its retry) deletes the run's unsent-entry key in KEYS[4] instead of reading
# the exit's marker (only the event that deletes it may send without a tag lookup),
# and reads no intent marker: nothing decides on it. A deleted key counts only on the
# server the executor last reconciled against (its run_id, read here from INFO in the
# same step): a server that restarted or was promoted since may have brought back a
# key whose DEL it lost, and the executor's run_id poll notices that only later.
_LOCK_READ = """
-- KEYS: [1] lock_state:{id} (string), [2] runtime:{id} (hash), [3] strategy:{id} (string),
--       [4] exit:attempted:{id}:{run_id} (string; entry:unsent:{id}:{run_id} for an entry),
--       [5] stoploss:fired:{id}:{run_id} or
--       squareoff:requested:{id}:{run_id} (string; the intent marker, or KEYS[4] again),
--       [6] broker:{user_id} (hash; only if ARGV[3] is '1'), [6 or 7] ratelimit:orders:{fp} (zset; only with ARGV[7..10])
-- ARGV: [1] owner token, [2] TTL ms, [3] '1' if KEYS[6] is the credentials hash else '0', [4] run_id,
--       [5] '1' if the event is an entry (BUY or its retry) else '0', [6] an entry's trusted server
--       identity (the run_ids of the server(s) last reconciled against) or '', [7] rate limit,
--       [8] rate window ms, [9] rate member, [10] exit marker TTL s (7-10 only with the rate key)
-- Returns: nil if the lock is held by anyone, else {config or false, runtime HGETALL, KEYS[4] existed 0/1
--          (an entry deleted it; 2 if it did on a server whose run_id is not in ARGV[6]),
--          credentials HGETALL or false, slot, intent marker 0/1}; slot is 0 if an order slot
--          was taken (and an exit's marker set), -1 if none was asked for or the order is not one
--          sent without a tag lookup, else ms until a slot frees; an entry answers 0 for the intent marker
""" + TAKE_SLOT_FN + TAKE_LOCK_FN + """
local runtime = take_lock(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if not runtime then return nil end
local function runtime_field(name)
  for i = 1, #runtime, 2 do
    if runtime[i] == name then return runtime[i + 1] end
  end
  return false
end
local n = 5
local creds = false
if ARGV[3] == '1' then
  n = 6
  creds = redis.call('HGETALL', KEYS[6])
end
local entry = ARGV[5] == '1'
local config = redis.call('GET', KEYS[3])
local marker
if entry then
  marker = redis.call('DEL', KEYS[4])
  if marker == 1 then
    local id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
    if not id or not string.find(ARGV[6], id, 1, true) then marker = 2 end
  end
else
  marker = redis.call('EXISTS', KEYS[4])
end
local slot = -1
if KEYS[n + 1] and config and cjson.decode(config)['run_id'] == ARGV[4] then
  local position = runtime_field('position')
  local unlooked
  if entry then unlooked = marker == 1 and (position == 'none' or not position)
  else unlooked = marker == 0 and position == 'bought' end
  if unlooked then
    slot = take_slot(KEYS[n + 1], tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9])
    if slot == 0 and not entry then redis.call('SET', KEYS[4], '1', 'EX', ARGV[10]) end
  end
end
local intent = 0
if not entry then intent = redis.call('EXISTS', KEYS[5]) end
return {config, runtime, marker, creds, slot, intent}
"""

# Runtime is only written while the same run is loaded: a late event must not
# resurrect the hash of an unloaded run. The lock is released only with the ack
# (an entry acked is done; one not acked yet is still being worked on).
_COMMIT = """
-- KEYS: [1] runtime:{id} (hash), [2] strategy:{id} (string), [3] queue:order_logs (stream),
--       [4] control:strategies (stream), [5] queue:orders (stream), [6] lock_state:{id} (string),
--       [7] notify:events (stream)
-- ARGV: [1] run_id, [2] runtime fields as a JSON flat list or '', [3] control message JSON or '',
--       [4] order-log row JSON, [5] control MAXLEN, [6] follow-up (ABORT) event JSON or '',
--       [7] consumer group, [8] entry id to ack or '', [9] owner token to release with the ack or '',
--       [10] notice JSON or '', [11] notify MAXLEN
-- Returns: 1
""" + RELEASE_LOCK_FN + """
local fields = nil
if ARGV[2] ~= '' then
  local raw = redis.call('GET', KEYS[2])
  if raw and cjson.decode(raw)['run_id'] == ARGV[1] then
    fields = cjson.decode(ARGV[2])
    if ARGV[3] ~= '' then
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[3])
    end
  end
end
redis.call('XADD', KEYS[3], '*', 'row', ARGV[4])
if ARGV[10] ~= '' then redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[11], '*', 'notice', ARGV[10]) end
if ARGV[6] ~= '' then redis.call('XADD', KEYS[5], '*', 'event', ARGV[6]) end
if ARGV[8] ~= '' then
  redis.call('XACK', KEYS[5], ARGV[7], ARGV[8])
  -- The runtime fields and the released lock's lock_state: one HSET.
  release_lock(KEYS[6], KEYS[1], ARGV[9], fields)
elseif fields then
  redis.call('HSET', KEYS[1], unpack(fields))
end
return 1
"""

_ACK_RELEASE = """
-- KEYS: [1] queue:orders (stream), [2] lock_state:{id} (string), [3] runtime:{id} (hash)
-- ARGV: [1] consumer group, [2] entry id, [3] owner token
-- Returns: 1 (the entry acked; the lock released if still the token's)
""" + RELEASE_LOCK_FN + """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
release_lock(KEYS[2], KEYS[3], ARGV[3])
return 1
"""

# With a strategy key: if that run is the one loaded (and this call acked the entry),
# XADD the ABORT in the same step, so a given-up event never leaves its run stuck.
_DEAD_LETTER = """
-- KEYS: [1] queue:orders:dead (stream), [2] queue:orders (stream), [3] strategy:{id} (string; optional)
-- ARGV: [1] raw entry, [2] reason, [3] entry id, [4] deliveries, [5] consumer group, [6] dead MAXLEN,
--       [7] run_id, [8] ABORT event JSON (both only with KEYS[3])
-- Returns: 2 if the ABORT was queued, else the XACK count (0 or 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[1], 'reason', ARGV[2],
           'msg_id', ARGV[3], 'deliveries', ARGV[4])
local acked = redis.call('XACK', KEYS[2], ARGV[5], ARGV[3])
if acked == 1 and KEYS[3] then
  local config = redis.call('GET', KEYS[3])
  if config and cjson.decode(config)['run_id'] == ARGV[7] then
    redis.call('XADD', KEYS[2], '*', 'event', ARGV[8])
    return 2
  end
end
return acked
"""


ENTRY_SCAN_MAX = 10_000

# Pending: delivered, not acked (a dead consumer may hold it).
_ENTRY_PENDING = """
-- KEYS: [1] queue:orders (stream)
-- ARGV: [1] consumer group, [2] strategy_id, [3] run_id, [4] scan limit
-- Returns: 1 if an entry event (BUY, or RETRY of a BUY) of that run is pending in the group or not yet
--          delivered, else 0
local function is_entry(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'event' then
      local ok, event = pcall(cjson.decode, fields[i + 1])
      if ok and type(event) == 'table' and event['strategy_id'] == ARGV[2] and event['run_id'] == ARGV[3]
         and (event['event_type'] == 'BUY' or (event['event_type'] == 'RETRY' and event['retry_of'] == 'BUY')) then
        return true
      end
    end
  end
  return false
end
local limit = tonumber(ARGV[4])
for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', limit)) do
  local entry = redis.call('XRANGE', KEYS[1], p[1], p[1])
  if entry[1] and is_entry(entry[1][2]) then return 1 end
end
local last = '0-0'
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  for i = 1, #group, 2 do
    if group[i] == 'name' and group[i + 1] == ARGV[1] then
      for j = 1, #group, 2 do
        if group[j] == 'last-delivered-id' then last = group[j + 1] end
      end
    end
  end
end
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', limit)) do
  if is_entry(entry[2]) then return 1 end
end
return 0
"""


@dataclass
class Held(Lease):
    """A held strategy lock and what was read under it when it was taken."""

    raw_config: bytes | None = None
    runtime: dict[bytes, bytes] = field(default_factory=dict)
    exit_attempted: bool = False  # an exit's: the exit marker was set
    entry_unsent: bool = False  # an entry's: it deleted the run's unsent-entry key (nothing was sent yet)
    credentials: dict[bytes, bytes] | None = None
    credentials_user: str | None = None
    slot_fp: str | None = None  # an order slot of this fingerprint was taken (and an exit's marker set)
    slot: TakenSlot | None = None  # that slot, to use while fresh
    intent_marked: bool = False  # the intent marker asked for existed (stop-loss fired, square-off requested)


def _pairs(flat: list[bytes] | None) -> dict[bytes, bytes]:
    it = iter(flat or ())
    return dict(zip(it, it, strict=True))


class OrderState:
    """The executor's Redis writes, each one script."""

    def __init__(self, redis: Redis, *, lock_ttl_ms: int, lock_wait_s: float) -> None:
        self.redis = redis
        # The server identity (libs.service.redis_client.server_run_id) of the last
        # reconciliation, which forgot every unsent-entry key a lost write could have
        # brought back; set by the reconciler. None: no entry skips its tag lookup.
        self.trusted_identity: str | None = None
        self.lock_ttl_ms, self.lock_wait_s = lock_ttl_ms, lock_wait_s
        self.locks = StrategyLocks(redis, role="executor", ttl_ms=lock_ttl_ms, wait_s=lock_wait_s)
        self._lock_read = redis.register_script(_LOCK_READ)
        self._commit = redis.register_script(_COMMIT)
        self._ack_release = redis.register_script(_ACK_RELEASE)
        self._dead = redis.register_script(_DEAD_LETTER)
        self._entry_pending = redis.register_script(_ENTRY_PENDING)

    def strategy_lock(self, strategy_id: str) -> contextlib.AbstractAsyncContextManager[Lease]:
        """Hold `lock_state:{id}` (renewed while held); raise LockTimeout if it never frees."""
        return self.locks.hold(strategy_id)

    @contextlib.asynccontextmanager
    async def locked_read(self, strategy_id: str, run_id: str, credentials_user: str | None,
                          order_slot: tuple[str, str, list[Any]] | None = None,
                          exit_mark_ttl_s: int = 0, intent_marker: str | None = None,
                          *, entry: bool = False) -> AsyncIterator[Held]:
        """Hold the strategy's lock; the Held carries config, runtime, exit marker and credentials read with it.

        `credentials_user` is a guess (the owner seen before); the caller checks it
        against the config's user_id before using the hash. `order_slot` = (fp,
        rate key, slot args): for an order sent without a lookup, take its slot
        (and for an exit set the exit marker) in the same step (see _LOCK_READ). `intent_marker`: a key whose
        existence is read in the same step (Held.intent_marked). An `entry` (BUY or
        its retry) deletes the run's unsent-entry key instead (Held.entry_unsent: it
        existed), and reads no intent marker.
        """
        lock, runtime = keys.lock_key(strategy_id), keys.runtime_key(strategy_id)
        marker = (keys.entry_unsent_key if entry else keys.exit_attempt_key)(strategy_id, run_id)
        # The intent marker is the strategy's own key (same partition tag): always in the lock's slot.
        script_keys = [lock, runtime, keys.strategy_key(strategy_id), marker, intent_marker or marker]
        slot = keys.hash_slot(lock)
        if credentials_user is not None and keys.hash_slot(keys.broker_credentials_key(credentials_user)) != slot:
            credentials_user = None  # another slot: the handler reads them on their own
        if order_slot is not None and keys.hash_slot(order_slot[1]) != slot:
            order_slot = None  # another slot: the handler takes the slot on its own
        if credentials_user is not None:
            script_keys.append(keys.broker_credentials_key(credentials_user))
        held = Held(strategy_id, self.locks.new_token(), credentials_user=credentials_user)
        args: list[Any] = [held.token, self.lock_ttl_ms, "1" if credentials_user is not None else "0", run_id,
                           "1" if entry else "0", (self.trusted_identity or "") if entry else ""]
        if order_slot is not None:
            script_keys.append(order_slot[1])
            args += [*order_slot[2], exit_mark_ttl_s]
        reply = await self.locks.take(held, lambda: self._lock_read(keys=script_keys, args=args))
        raw_config, runtime_flat, marker_set, creds, slot, intent_set = reply
        held.raw_config, held.runtime = raw_config, _pairs(runtime_flat)
        if entry:
            held.entry_unsent = int(marker_set) == 1
        else:
            held.exit_attempted = bool(marker_set)
        held.credentials = _pairs(creds) if creds is not None else None
        if order_slot is not None and int(slot) == 0:
            # The successful attempt was sent at valid_until - TTL; the slot was granted after that.
            held.slot_fp = order_slot[0]
            held.slot = TakenSlot(str(order_slot[2][2]), held.valid_until - self.lock_ttl_ms / 1000)
        held.intent_marked = intent_marker is not None and bool(intent_set)
        async with self.locks.keep(held):
            yield held

    async def commit(self, *, strategy_id: str, run_id: str, row: bytes, runtime_fields: dict[str, str] | None,
                     control: bytes | None, abort_event: bytes | None, ack_msg_id: str | None,
                     held: Held | None = None, notice: bytes | None = None) -> None:
        """Write runtime, control message, log row, follow-up event and notice; ack if asked, all at once.

        With an ack and a `held` lock, the lock is released in the same step.
        """
        flat = [x for pair in (runtime_fields or {}).items() for x in pair]
        release = held is not None and ack_msg_id is not None
        part = keys.partition_of(strategy_id)
        await self._commit(
            keys=[keys.runtime_key(strategy_id), keys.strategy_key(strategy_id), keys.order_logs_stream(part),
                  keys.control_stream(part), keys.orders_stream(part), keys.lock_key(strategy_id),
                  keys.notify_stream(part)],
            args=[run_id, dumps(flat) if flat else b"", control or b"", row, CONTROL_MAXLEN,
                  abort_event or b"", keys.EXECUTORS_GROUP, ack_msg_id or b"", held.token if release else b"",
                  notice or b"", keys.NOTIFY_MAXLEN],
        )
        if release:
            held.released = True

    async def ack(self, msg_id: str, held: Held | None = None, *, strategy_id: str | None = None) -> None:
        """Ack the entry of `held`'s (or `strategy_id`'s) partition (and release `held` in the same step)."""
        sid = held.strategy_id if held is not None else strategy_id
        stream = keys.orders_stream(keys.partition_of(sid)) if sid is not None else keys.ORDERS_STREAM
        if held is None:
            await self.redis.xack(stream, keys.EXECUTORS_GROUP, msg_id)
            return
        await self._ack_release(keys=[stream, keys.lock_key(sid), keys.runtime_key(sid)],
                                args=[keys.EXECUTORS_GROUP, msg_id, held.token])
        held.released = True

    async def entry_pending(self, strategy_id: str, run_id: str) -> bool:
        """Return whether the run's BUY (or a RETRY of it) waits in `queue:orders`: pending or not yet read.

        Only asked on the rare path of an exit that finds no position; one script.
        """
        stream = keys.orders_stream(keys.partition_of(strategy_id))  # every event of a strategy is in its partition
        return bool(await self._entry_pending(keys=[stream],
                                              args=[keys.EXECUTORS_GROUP, strategy_id, run_id, ENTRY_SCAN_MAX]))

    async def dead_letter(self, msg_id: str, raw: bytes, reason: str, deliveries: int,
                          abort: tuple[str, str, bytes] | None = None, *, partition: int = 0) -> bool:
        """Move an entry of `partition`'s stream to its `queue:orders:dead` with its reason and ack it, atomically.

        `abort` = (strategy_id, run_id, ABORT event JSON), a strategy of the same
        partition: queue that ABORT in the same step if that run is the one loaded;
        return True if it was queued.
        """
        script_keys = [keys.orders_dead_stream(partition), keys.orders_stream(partition)]
        args: list[Any] = [raw, reason, msg_id, deliveries, keys.EXECUTORS_GROUP, DEAD_MAXLEN]
        if abort is not None:
            script_keys.append(keys.strategy_key(abort[0]))
            args += [abort[1], abort[2]]
        return int(await self._dead(keys=script_keys, args=args)) == 2
