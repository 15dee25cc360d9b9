"""The Lua scripts of runs, tokens, the scheduler, reconciliation, the rate limit and the notifier, run directly.

Each script runs through redis-py's Script, as its caller runs it, on real Redis
with the edge cases its header promises: missing keys, another run loaded,
duplicates, boundaries of time, count and limit. The last tests flush the
server's script cache between calls (what a Redis restart does) and count the
commands the scheduler's hot path sends.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

import pytest
from redis.asyncio import Redis

from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.models import StrategyConfig
from libs.service.scripts import script_for
from libs.trading import runs, tokens
from libs.trading.calendar import MarketCalendar
from services.api import notify
from services.executor import ratelimit, reconcile
from services.scheduler import mover
from tests.support.eventually import eventually

SID = str(uuid.uuid4())
RUN = "2026-01-05T03:00:00.000000+00:00"
OTHER_RUN = "2026-01-06T03:00:00.000000+00:00"
PART = keys.partition_of(SID)


def _loaded_config(run_id: str) -> bytes:
    return dumps({"strategy_id": SID, "run_id": run_id})


async def _time_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return seconds * 1000 + micros // 1000


# --- libs.trading.runs ----------------------------------------------------------------------------

LOAD_KEYS = [keys.strategy_key(SID), keys.runtime_key(SID), keys.symbol_strategies_key("INFY", PART),
             keys.schedule_key(PART), keys.control_stream(PART)]


async def test_load_replaces_the_runtime_and_schedules_buy_and_sell(redis: Redis) -> None:
    await redis.hset(keys.runtime_key(SID), mapping={"position": "bought", "last_sell_order": "old"})
    wakeups = redis.pubsub()
    await wakeups.subscribe(keys.SCHEDULE_WAKEUP_CHANNEL)
    load = redis.register_script(runs._LOAD)
    args = [b'{"run_id":"r"}', dumps(["position", "none", "updated_at", "t"]), SID, "BUY-member", 1000,
            "SELL-member", 2000, b'{"action":"started"}', 100, keys.SCHEDULE_WAKEUP_CHANNEL]
    try:
        assert await load(keys=[*LOAD_KEYS, keys.lock_key(SID)], args=args) == 1
        message = await eventually(lambda: wakeups.get_message(ignore_subscribe_messages=True, timeout=0.2))
        assert message["data"] == b"1000"  # the BUY's due time: sleeping schedulers recompute their sleep
    finally:
        await wakeups.aclose()
    assert await redis.get(keys.strategy_key(SID)) == b'{"run_id":"r"}'
    # lock_state follows the lock key (none here), whatever the fields say.
    assert await redis.hgetall(keys.runtime_key(SID)) == {b"position": b"none", b"updated_at": b"t",
                                                          b"lock_state": b"free"}
    assert await redis.smembers(LOAD_KEYS[2]) == {SID.encode()}
    assert await redis.zrange(LOAD_KEYS[3], 0, -1, withscores=True) == [(b"BUY-member", 1000), (b"SELL-member", 2000)]
    # Loading the same run again (a retried start) leaves one of each, plus one more `started`.
    assert await load(keys=[*LOAD_KEYS, keys.lock_key(SID)], args=args) == 1
    assert await redis.scard(LOAD_KEYS[2]) == 1 and await redis.zcard(LOAD_KEYS[3]) == 2
    assert [f[b"event"] for _, f in await redis.xrange(LOAD_KEYS[4])] == [b'{"action":"started"}'] * 2
    # Only a start's load of a new run writes the unsent-entry key (with its TTL); a reload never does.
    unsent = keys.entry_unsent_key(SID, "r")
    assert not await redis.exists(unsent)
    assert await load(keys=[*LOAD_KEYS, keys.lock_key(SID), unsent], args=[*args, 60]) == 1
    assert 0 < await redis.ttl(unsent) <= 60


@pytest.mark.parametrize("loaded", [True, False])
async def test_unload_removes_the_run_and_always_tells_the_listeners(redis: Redis, loaded: bool) -> None:
    if loaded:
        await redis.set(keys.strategy_key(SID), _loaded_config(RUN))
        await redis.hset(keys.runtime_key(SID), "position", "none")
        await redis.sadd(LOAD_KEYS[2], SID, "another-strategy")
        await redis.zadd(LOAD_KEYS[3], {"BUY-member": 1, "SELL-member": 2, "RETRY-member": 3})
        await redis.set(keys.entry_unsent_key(SID, RUN), "1")
    unload = redis.register_script(runs._UNLOAD)
    existed = await unload(keys=[*LOAD_KEYS, keys.entry_unsent_key(SID, RUN)],
                           args=[SID, "BUY-member", "SELL-member", b'{"action":"stopped"}', 100])
    assert existed == (2 if loaded else 0)
    assert not await redis.exists(keys.strategy_key(SID), keys.runtime_key(SID), keys.entry_unsent_key(SID, RUN))
    assert await redis.smembers(LOAD_KEYS[2]) == ({b"another-strategy"} if loaded else set())
    assert await redis.zrange(LOAD_KEYS[3], 0, -1) == ([b"RETRY-member"] if loaded else [])  # RETRYs stay
    assert [f[b"event"] for _, f in await redis.xrange(LOAD_KEYS[4])] == [b'{"action":"stopped"}']


async def test_scheduling_a_member_again_only_moves_its_due_time(redis: Redis) -> None:
    schedule = script_for(redis, runs._SCHEDULE)
    for due in (5000, 7000):
        assert await schedule(keys=[keys.schedule_key(PART)], args=["RETRY-member", due,
                                                                    keys.SCHEDULE_WAKEUP_CHANNEL]) == 1
    assert await redis.zrange(keys.schedule_key(PART), 0, -1, withscores=True) == [(b"RETRY-member", 7000)]


# --- libs.trading.tokens: broker:{user_id} ---------------------------------------------------

BROKER = keys.broker_credentials_key(uuid.uuid4())


async def test_token_answer_is_not_written_into_a_missing_hash(redis: Redis) -> None:
    mirror = redis.register_script(tokens._MIRROR)
    assert await mirror(keys=[BROKER], args=["ct-1", "expired", "0"]) == 0
    assert not await redis.exists(BROKER)  # a half hash without credentials would break the order path


async def test_token_answer_about_a_replaced_token_is_dropped(redis: Redis) -> None:
    await redis.hset(BROKER, mapping={"access_token": "ct-new", "token_state": "valid", "is_valid": "1"})
    mirror = redis.register_script(tokens._MIRROR)
    assert await mirror(keys=[BROKER], args=["ct-old", "expired", "0"]) == 0
    assert await redis.hgetall(BROKER) == {b"access_token": b"ct-new", b"token_state": b"valid", b"is_valid": b"1"}


async def test_token_answer_about_the_stored_token_is_written_and_unknown_keeps_validity(redis: Redis) -> None:
    await redis.hset(BROKER, mapping={"access_token": "ct-1", "token_state": "valid", "is_valid": "1"})
    mirror = redis.register_script(tokens._MIRROR)
    assert await mirror(keys=[BROKER], args=["ct-1", "unknown", ""]) == 1
    assert await redis.hmget(BROKER, "token_state", "is_valid") == [b"unknown", b"1"]
    assert await mirror(keys=[BROKER], args=["ct-1", "expired", "0"]) == 1
    assert await redis.hmget(BROKER, "token_state", "is_valid") == [b"expired", b"0"]


async def test_broker_hash_is_restored_only_when_missing(redis: Redis) -> None:
    restore = redis.register_script(tokens._RESTORE_BROKER)
    assert await restore(keys=[BROKER], args=[dumps(["api_key", "ak-ct", "is_valid", "1"])]) == 1
    assert await redis.hgetall(BROKER) == {b"api_key": b"ak-ct", b"is_valid": b"1"}
    # A newer login wrote it meanwhile: Postgres' older copy must not overwrite it.
    assert await restore(keys=[BROKER], args=[dumps(["api_key", "stale", "is_valid", "0"])]) == 0
    assert await redis.hgetall(BROKER) == {b"api_key": b"ak-ct", b"is_valid": b"1"}


# --- services.scheduler.mover ----------------------------------------------------------------------

MOVE_KEYS = [keys.schedule_key(0), keys.orders_stream(0)]


async def test_move_with_nothing_due_writes_nothing(redis: Redis) -> None:
    move = redis.register_script(mover._MOVE_DUE)
    assert await move(keys=MOVE_KEYS, args=[10_000, 500]) == []  # empty schedule
    await redis.zadd(MOVE_KEYS[0], {"later": 10_001})
    assert await move(keys=MOVE_KEYS, args=[10_000, 500]) == []
    assert not await redis.exists(MOVE_KEYS[1])  # no stream created
    assert await redis.zcard(MOVE_KEYS[0]) == 1


async def test_move_takes_members_due_at_now_inclusive_oldest_first_one_batch_at_a_time(redis: Redis) -> None:
    await redis.zadd(MOVE_KEYS[0], {"c": 10_000, "a": 9_000, "b": 9_500, "next-ms": 10_001})
    move = redis.register_script(mover._MOVE_DUE)
    assert await move(keys=MOVE_KEYS, args=[10_000, 2]) == [b"a", b"9000", b"b", b"9500"]
    assert await move(keys=MOVE_KEYS, args=[10_000, 2]) == [b"c", b"10000"]
    assert await redis.zrange(MOVE_KEYS[0], 0, -1) == [b"next-ms"]
    assert [f[b"event"] for _, f in await redis.xrange(MOVE_KEYS[1])] == [b"a", b"b", b"c"]


async def test_concurrent_moves_enqueue_each_member_once(redis: Redis) -> None:
    members = {f"event-{i}": i for i in range(200)}
    await redis.zadd(MOVE_KEYS[0], members)
    move = redis.register_script(mover._MOVE_DUE)

    async def drain() -> None:
        while await move(keys=MOVE_KEYS, args=[10_000, 7]):
            pass

    await asyncio.gather(*(drain() for _ in range(4)))
    moved = [f[b"event"].decode() for _, f in await redis.xrange(MOVE_KEYS[1])]
    assert sorted(moved) == sorted(members) and await redis.zcard(MOVE_KEYS[0]) == 0


# --- services.executor.reconcile --------------------------------------------------------------------

REBUILD_KEYS = [keys.runtime_key(SID), keys.control_stream(PART), keys.strategy_key(SID)]
EXITED_KEYS = [keys.order_logs_stream(PART), keys.control_stream(PART), keys.strategy_key(SID)]


@pytest.mark.parametrize(("loaded", "rebuilt"), [(None, 1), (RUN, 1), (OTHER_RUN, 0)])
async def test_rebuild_writes_runtime_and_message_unless_another_run_is_loaded(
        redis: Redis, loaded: str | None, rebuilt: int) -> None:
    if loaded:
        await redis.set(keys.strategy_key(SID), _loaded_config(loaded))
    await redis.hset(keys.runtime_key(SID), mapping={"position": "none", "lock_state": "free"})
    script = redis.register_script(reconcile._REBUILD)
    result = await script(keys=REBUILD_KEYS, args=[dumps(["position", "bought", "filled_quantity", "3"]),
                                                   b'{"action":"position"}', 100, RUN])
    assert result == rebuilt
    expected = {b"position": b"bought", b"filled_quantity": b"3"} if rebuilt else {b"position": b"none"}
    assert await redis.hgetall(keys.runtime_key(SID)) == {**expected, b"lock_state": b"free"}  # fields merged
    assert await redis.xlen(keys.control_stream(PART)) == rebuilt


@pytest.mark.parametrize(("loaded", "answer"), [(None, 2), (RUN, 1), (OTHER_RUN, 0)])
async def test_exited_writes_row_and_message_unless_another_run_is_loaded(
        redis: Redis, loaded: str | None, answer: int) -> None:
    if loaded:
        await redis.set(keys.strategy_key(SID), _loaded_config(loaded))
    script = redis.register_script(reconcile._EXITED)
    assert await script(keys=EXITED_KEYS, args=[b'{"row":1}', b'{"action":"position"}', 100, RUN]) == answer
    written = 0 if answer == 0 else 1
    assert await redis.xlen(keys.order_logs_stream(PART)) == written
    assert await redis.xlen(keys.control_stream(PART)) == written
    assert await redis.exists(keys.strategy_key(SID)) == (1 if loaded else 0)  # the caller unloads, not the script


# --- services.executor.ratelimit --------------------------------------------------------------------

RATE = keys.order_rate_key("fp-test")
MARKER = keys.exit_attempt_key(SID, RUN)


async def test_rate_slots_stop_at_the_limit_and_answer_the_wait(redis: Redis) -> None:
    take = redis.register_script(ratelimit._TAKE_SLOT)
    assert [await take(keys=[RATE], args=[2, 60_000, f"m{i}", 0]) for i in range(2)] == [0, 0]
    wait = await take(keys=[RATE], args=[2, 60_000, "m2", 0])
    assert 0 < wait <= 60_000
    assert await redis.zcard(RATE) == 2  # a refused attempt takes nothing
    assert 0 < await redis.pttl(RATE) <= 60_000  # idle for a window: gone


async def test_rate_slot_frees_once_the_oldest_leaves_the_window(redis: Redis) -> None:
    take = redis.register_script(ratelimit._TAKE_SLOT)
    assert await take(keys=[RATE], args=[1, 200, "first", 0]) == 0
    assert 0 < await take(keys=[RATE], args=[1, 200, "second", 0]) <= 200
    await eventually(lambda: _granted(take, [RATE], [1, 200, "third", 0]), timeout=5)


async def _granted(take: Any, script_keys: list[str], args: list[Any]) -> bool:
    return await take(keys=script_keys, args=args) == 0


async def test_exit_marker_is_set_only_with_a_granted_slot(redis: Redis) -> None:
    take = redis.register_script(ratelimit._TAKE_SLOT)
    assert await take(keys=[RATE, MARKER], args=[1, 60_000, "exit-1", 120]) == 0
    assert await redis.get(MARKER) == b"1" and 0 < await redis.ttl(MARKER) <= 120
    other = keys.exit_attempt_key(SID, OTHER_RUN)
    assert await take(keys=[RATE, other], args=[1, 60_000, "exit-2", 120]) > 0
    assert not await redis.exists(other)  # refused: no order goes out, so no marker either



async def test_the_rate_log_is_trimmed_only_when_it_looks_full(redis: Redis) -> None:
    take = redis.register_script(ratelimit._TAKE_SLOT)
    old = (await redis.time())[0] * 1000 - 120_000  # two minutes ago: out of any window here
    await redis.zadd(RATE, {"1:a": old, "2:b": old})
    assert await take(keys=[RATE], args=[3, 60_000, "c", 0]) == 0
    assert await redis.zcard(RATE) == 3  # below the limit in all: granted, nothing trimmed
    # Full in all, but two are out of the window: trimmed, granted.
    assert await take(keys=[RATE], args=[3, 60_000, "d", 0]) == 0
    assert sorted(m.decode().split(":", 1)[1] for m in await redis.zrange(RATE, 0, -1)) == ["c", "d"]
    assert await take(keys=[RATE], args=[2, 60_000, "e", 0]) > 0  # full within the window: refused


async def test_a_stale_slot_is_given_back_in_the_step_that_takes_the_new_one(redis: Redis) -> None:
    take = redis.register_script(ratelimit._TAKE_SLOT)
    assert await take(keys=[RATE], args=[2, 60_000, "other", 0]) == 0
    assert await take(keys=[RATE], args=[2, 60_000, "stale", 0]) == 0
    # Full, yet the stale slot (never used) comes back: the new one takes its place.
    assert await take(keys=[RATE], args=[2, 60_000, "new", 0, "stale"]) == 0
    members = sorted(m.decode().split(":", 1)[1] for m in await redis.zrange(RATE, 0, -1))
    assert members == ["new", "other"]
    # Only the caller's own member is given back, matched whole: no other slot is freed.
    assert await take(keys=[RATE], args=[2, 60_000, "next", 0, "ew"]) > 0
    assert await redis.zcard(RATE) == 2


async def test_the_limiter_uses_a_slot_taken_with_the_lock_only_while_fresh(redis: Redis) -> None:
    limiter = ratelimit.OrderRateLimiter(redis, limit=1, window_ms=1100, max_wait_s=0.05)
    assert limiter.fresh_s == 0.05  # half the margin over Kite's second
    key, args = limiter.slot_request("fp-test")
    take = redis.register_script(ratelimit._TAKE_SLOT)
    now = asyncio.get_running_loop().time()
    assert await take(keys=[key], args=[*args, 0]) == 0
    slot = ratelimit.TakenSlot(str(args[2]), now)
    assert limiter.fresh(slot)
    stale = ratelimit.TakenSlot(slot.member, now - 1)
    assert not limiter.fresh(stale)
    # Limit 1 and the window full with the stale slot: replacing it needs no wait, holds one slot.
    assert await limiter.acquire("fp-test", replace=stale) < 0.05
    assert await redis.zcard(key) == 1
    with pytest.raises(ratelimit.RateLimitTimeout):
        await limiter.acquire("fp-test")


# --- services.api.notify ----------------------------------------------------------------------------

NOTIFY_KEYS = [keys.notify_schedule(0), keys.notify_pending(0)]


async def test_claim_leases_due_deliveries_and_drops_settled_ones(redis: Redis) -> None:
    claim = redis.register_script(notify._CLAIM)
    assert await claim(keys=NOTIFY_KEYS, args=[10_000, 30_000, 100]) == []  # empty schedule
    await redis.zadd(NOTIFY_KEYS[0], {"n1|webhook": 9_000, "n2|webhook": 9_500, "settled|webhook": 9_800,
                                      "n3|webhook": 10_000, "later|webhook": 10_001})
    await redis.hset(NOTIFY_KEYS[1], mapping={"n1|webhook": "p1", "n2|webhook": "p2", "n3|webhook": "p3",
                                             "later|webhook": "p4"})
    # At most 3 due members are read; one of them has no payload (settled meanwhile): dropped, not sent.
    assert await claim(keys=NOTIFY_KEYS, args=[10_000, 30_000, 3]) == [b"n1|webhook", b"p1", b"n2|webhook", b"p2"]
    assert await redis.zscore(NOTIFY_KEYS[0], "settled|webhook") is None
    assert await claim(keys=NOTIFY_KEYS, args=[10_000, 30_000, 3]) == [b"n3|webhook", b"p3"]  # due at now: inclusive
    schedule = dict(await redis.zrange(NOTIFY_KEYS[0], 0, -1, withscores=True))
    assert schedule == {b"later|webhook": 10_001, b"n1|webhook": 40_000, b"n2|webhook": 40_000,
                        b"n3|webhook": 40_000}  # leased: due again only if the sender never settles
    assert await claim(keys=NOTIFY_KEYS, args=[39_999, 30_000, 100]) == [b"later|webhook", b"p4"]


# --- a Redis restart: the script cache is gone ------------------------------------------------------


async def test_every_caller_reloads_its_script_after_a_script_flush(redis: Redis) -> None:
    sid = uuid.uuid4()
    config = StrategyConfig(strategy_id=sid, user_id=uuid.uuid4(), symbol="INFY", buy_time="09:30:00",
                            sell_time="15:00:00", stop_loss=1500.0, quantity=1, status="running", run_id=RUN)
    plan = runs.plan_run(config, MarketCalendar("always_open"), datetime.fromisoformat(RUN))
    due = mover.DueMover(redis)
    limiter = ratelimit.OrderRateLimiter(redis, limit=10, window_ms=1000, max_wait_s=1)
    broker = keys.broker_credentials_key(config.user_id)
    await redis.hset(broker, mapping={"access_token": "ct-1"})
    for _ in range(2):
        await redis.script_flush()  # what a restart does; the clients and their Scripts live on
        await runs.load_run(redis, config, plan)
        assert await runs.unload_run(redis, config, plan) is True
        await runs.schedule_event(redis, plan.sell, 1)
        assert [m.event_type for m in await due.move_all_due()] == ["SELL"]
        assert await tokens.mirror_expired(redis, config.user_id, "ct-1") is True
        assert await limiter.acquire("fp-flush") >= 0
    assert await redis.xlen(keys.orders_stream(0)) == 2


async def test_the_mover_sends_one_evalsha_per_batch_and_loads_only_after_a_flush(redis: Redis) -> None:
    due = mover.DueMover(redis)
    await due.move_all_due()  # loads the script if this server never saw it
    await redis.config_resetstat()
    await redis.zadd(keys.schedule_key(0), {"a": 1})
    assert len(await due.move_all_due()) == 1
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert "cmdstat_script|load" not in stats and "cmdstat_eval" not in stats
    await redis.script_flush()
    await redis.config_resetstat()
    await redis.zadd(keys.schedule_key(0), {"b": 1})
    assert len(await due.move_all_due()) == 1  # NOSCRIPT, SCRIPT LOAD, EVALSHA again
    stats = await redis.info("commandstats")
    assert stats["cmdstat_script|load"]["calls"] == 1
    assert await redis.script_exists(due._move.sha) == [True]
