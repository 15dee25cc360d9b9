"""Executor under broker faults and bad entries: retries, tag lookup, aborts, dead letters."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.local.procs import RedisServer
from libs.schema import keys
from libs.schema.models import AbortEvent, Position, StrategyStatus
from libs.schema.tables import Strategy
from services.executor.consumer import ensure_group
from services.executor.state import LockLost, OrderState
from tests.integration.executor_support import (
    Run,
    broker_orders,
    enqueue,
    fake_scheduler,
    new_account,
    order_logs,
    running_executor,
    runtime,
    start_run,
    strategy_row,
    write_broker_hash,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin
from tests.support.runs import status_is

pytestmark = pytest.mark.timeout(60)


async def new_run(sim: SimAdmin, engine: AsyncEngine, redis: Redis) -> Run:
    return await start_run(engine, redis, await new_account(sim, engine, redis))


async def rows_of(engine: AsyncEngine, run: Run, count: int, timeout: float = 10) -> list:
    async def check() -> list:
        rows = await order_logs(engine, run)
        assert len(rows) >= count, rows
        return rows
    return await eventually(check, timeout=timeout)


async def bought(redis: Redis, run: Run) -> bool:
    return (await runtime(redis, run)).position == Position.bought


async def test_malformed_entries_are_dead_lettered_and_consuming_goes_on(redis: Redis, engine: AsyncEngine,
                                                                         sim: SimAdmin, settings) -> None:
    async with running_executor(settings):
        run = await new_run(sim, engine, redis)
        no_event = (await redis.xadd(keys.ORDERS_STREAM, {"something": "else"})).decode()
        bad_json = await enqueue(redis, b"{not json")
        invalid = await enqueue(redis, b'{"event_type": "BUY", "strategy_id": "nope"}')
        await enqueue(redis, run.buy())
        await eventually(lambda: bought(redis, run))
        dead = await eventually(lambda: _dead(redis, 3))
        by_id = {fields[b"msg_id"].decode(): fields[b"reason"].decode() for _, fields in dead}
        assert set(by_id) == {no_event, bad_json, invalid}
        assert "no `event` field" in by_id[no_event] and "JSON" in by_id[bad_json] and "strategy_id" in by_id[invalid]
        pending = await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
        assert pending["pending"] == 0


async def test_entry_delivered_too_often_goes_to_dead_letters(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                              settings) -> None:
    run = await new_run(sim, engine, redis)
    await ensure_group(redis, keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
    msg_id = await enqueue(redis, run.buy())
    # A consumer that keeps crashing on it: delivered, then claimed again and again.
    await redis.xreadgroup(keys.EXECUTORS_GROUP, "ghost", {keys.ORDERS_STREAM: ">"})
    for _ in range(settings.max_deliveries):
        await redis.xclaim(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, "ghost", 0, [msg_id])
    async with running_executor(settings):
        dead = await eventually(lambda: _dead(redis, 1), timeout=10)
    assert dead[0][1][b"msg_id"].decode() == msg_id and b"delivered" in dead[0][1][b"reason"]
    assert broker_orders(sim, run.tag("entry")) == []
    assert (await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP))["pending"] == 0


async def test_dead_consumers_pending_entry_is_claimed_and_placed_once(redis: Redis, engine: AsyncEngine,
                                                                       sim: SimAdmin, settings) -> None:
    run = await new_run(sim, engine, redis)
    await ensure_group(redis, keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
    await enqueue(redis, run.buy())
    await redis.xreadgroup(keys.EXECUTORS_GROUP, "crashed-executor", {keys.ORDERS_STREAM: ">"})
    async with running_executor(settings):
        await eventually(lambda: bought(redis, run), timeout=10)
    assert len(broker_orders(sim, run.tag("entry"))) == 1
    assert (await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP))["pending"] == 0


async def test_server_error_is_retried_and_then_succeeds(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                         settings) -> None:
    run = await new_run(sim, engine, redis)
    async with running_executor(settings), fake_scheduler(redis):
        # Exactly one failed order request, however fast the retry comes back
        # (clearing an error rate after the first failure raced the 50 ms
        # retry); set after start-up, whose reconciliation reads the orders too.
        sim.set_faults(burst_500=1, routes=["orders"])
        await enqueue(redis, run.buy())
        await eventually(lambda: bought(redis, run), timeout=10)
        rows = await eventually(lambda: _ends_in_success(engine, run), timeout=10)
    assert [(r.event_type.value, r.status.value) for r in rows] == [("BUY", "failed"), ("RETRY", "success")]
    assert rows[0].response_payload["retry_attempt"] == 2
    assert len(broker_orders(sim, run.tag("entry"))) == 1


async def _ends_in_success(engine: AsyncEngine, run: Run) -> list:
    rows = await order_logs(engine, run)
    assert rows and rows[-1].status.value == "success", rows
    return rows


async def test_timeout_after_accept_finds_the_order_by_tag(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                           settings) -> None:
    run = await new_run(sim, engine, redis)
    async with running_executor(settings):
        await enqueue(redis, run.buy())
        await eventually(lambda: bought(redis, run))
        sim.set_faults(timeout_after_accept_rate=1.0, routes=["orders"])
        await enqueue(redis, run.sell())
        rows = await rows_of(engine, run, 2)
    assert rows[1].status.value == "success" and rows[1].response_payload["found_by_tag"] is True
    assert len(broker_orders(sim, run.tag("exit"))) == 1
    assert len(broker_orders(sim, run.tag("entry"))) == 1


async def test_rate_limit_429_is_retried(redis: Redis, engine: AsyncEngine, sim: SimAdmin, settings) -> None:
    run = await new_run(sim, engine, redis)
    async with running_executor(settings), fake_scheduler(redis):
        await enqueue(redis, run.buy())
        await eventually(lambda: bought(redis, run))
        sim.set_faults(burst_429=1, routes=["orders"])
        await enqueue(redis, run.sell())
        rows = await rows_of(engine, run, 3)
    assert [(r.event_type.value, r.status.value) for r in rows] == [
        ("BUY", "success"), ("SELL", "failed"), ("RETRY", "success")]
    assert rows[1].response_payload["code"] == 429
    assert len(broker_orders(sim, run.tag("exit"))) == 1


async def test_expired_token_aborts_the_run(redis: Redis, engine: AsyncEngine, sim: SimAdmin, settings) -> None:
    run = await new_run(sim, engine, redis)
    sim.expire(run.account.api_key)
    async with running_executor(settings):
        await enqueue(redis, run.buy())
        rows = await rows_of(engine, run, 2)
        await eventually(lambda: status_is(engine, run, StrategyStatus.failed))
    assert [(r.event_type.value, r.status.value) for r in rows] == [("BUY", "failed"), ("ABORT", "failed")]
    assert "Kite session expired: log in again" in (await strategy_row(engine, run)).failure_reason
    assert not await redis.exists(keys.strategy_key(run.sid))
    assert sim.orders(api_key=run.account.api_key) == []


async def test_rejected_exit_retries_then_aborts_with_the_position_open(redis: Redis, engine: AsyncEngine,
                                                                       sim: SimAdmin, settings) -> None:
    run = await new_run(sim, engine, redis)
    async with running_executor(settings), fake_scheduler(redis):
        await enqueue(redis, run.buy())
        await eventually(lambda: bought(redis, run))
        sim.set_faults(reject_rate=1.0)
        await enqueue(redis, run.stoploss(1400.0))
        await eventually(lambda: status_is(engine, run, StrategyStatus.failed), timeout=15)
        rows = await rows_of(engine, run, 5)
    kinds = [(r.event_type.value, r.status.value) for r in rows]
    assert kinds == [("BUY", "success"), ("STOPLOSS", "failed"), ("RETRY", "failed"), ("RETRY", "failed"),
                     ("ABORT", "failed")]
    exits = broker_orders(sim, run.tag("exit"))
    assert len(exits) == settings.retry_max_attempts and {o["status"] for o in exits} == {"REJECTED"}
    assert "STOPLOSS failed after 3 attempts" in (await strategy_row(engine, run)).failure_reason


async def test_dead_lettered_event_of_the_loaded_run_aborts_it_once(redis: Redis, engine: AsyncEngine,
                                                                    sim: SimAdmin, settings) -> None:
    plain, square = await new_run(sim, engine, redis), await new_run(sim, engine, redis)
    for run in (plain, square):
        await redis.hset(keys.runtime_key(run.sid), "position", Position.bought.value)
    async with engine.begin() as conn:
        await conn.execute(update(Strategy).where(Strategy.id == square.config.strategy_id).values(status="stopped"))
    await ensure_group(redis, keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
    dead_ids = [await enqueue(redis, plain.sell()), await enqueue(redis, square.sell(metadata={"square_off": True})),
                # A dead ABORT must not queue another ABORT (no loop).
                await enqueue(redis, AbortEvent(strategy_id=plain.config.strategy_id, run_id=plain.config.run_id,
                                                trading_day=plain.plan.trading_day, reason="test"))]
    await redis.xreadgroup(keys.EXECUTORS_GROUP, "ghost", {keys.ORDERS_STREAM: ">"})
    for _ in range(settings.max_deliveries):
        await redis.xclaim(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, "ghost", 0, dead_ids)
    async with running_executor(settings):
        await eventually(lambda: _dead(redis, 3), timeout=10)
        # A dead SELL leaves the run neither stuck `running` nor loaded (start/delete would answer 409).
        await eventually(lambda: status_is(engine, plain, StrategyStatus.failed), timeout=10)
        await eventually(lambda: _gone(redis, plain))
        await eventually(lambda: _gone(redis, square))
        rows = await rows_of(engine, plain, 1)
    assert [(r.event_type.value, r.status.value) for r in rows] == [("ABORT", "failed")]
    reason = (await strategy_row(engine, plain)).failure_reason
    assert "dead-lettered" in reason and "position may be open" in reason
    assert (await strategy_row(engine, square)).status == StrategyStatus.stopped
    assert [(r.event_type.value, r.status.value) for r in await rows_of(engine, square, 1)] == [("ABORT", "failed")]
    assert broker_orders(sim, plain.tag("exit")) == broker_orders(sim, square.tag("exit")) == []
    entries = await redis.xrange(keys.ORDERS_STREAM)
    aborts = [f for _, f in entries if b'"ABORT"' in f[b"event"]]
    assert len(aborts) == 3  # the dead one + one per dead SELL


async def _gone(redis: Redis, run: Run) -> bool:
    return not await redis.exists(keys.strategy_key(run.sid), keys.runtime_key(run.sid))


async def test_broker_account_changed_since_start_aborts_without_placing(redis: Redis, engine: AsyncEngine,
                                                                         sim: SimAdmin, settings) -> None:
    entry_run, exit_run = await new_run(sim, engine, redis), await new_run(sim, engine, redis)
    async with running_executor(settings):
        await enqueue(redis, exit_run.buy())
        await eventually(lambda: bought(redis, exit_run))
    # Both owners' broker hashes now hold another Kite account than the runs started on.
    other = await asyncio.to_thread(sim.create_account)
    for run in (entry_run, exit_run):
        await write_broker_hash(redis, run.account.user_id, other["api_key"], other["access_token"])
    async with running_executor(settings):
        # Reconciliation must not read the other account's book as this run's (no entry: `none`).
        assert await bought(redis, exit_run)
        await enqueue(redis, entry_run.buy())
        await enqueue(redis, exit_run.stoploss(1400.0))
        for run in (entry_run, exit_run):
            await eventually(lambda run=run: status_is(engine, run, StrategyStatus.failed), timeout=10)
            assert "broker account changed since start" in (await strategy_row(engine, run)).failure_reason
            assert not await redis.exists(keys.strategy_key(run.sid))
    assert sim.orders(api_key=other["api_key"]) == []
    assert sim.orders(api_key=entry_run.account.api_key) == []
    assert [o["transaction_type"] for o in sim.orders(api_key=exit_run.account.api_key)] == ["BUY"]


async def test_lock_renewer_survives_redis_errors_and_records_a_lost_lock(
        redis: Redis, redis_server: RedisServer) -> None:
    state = OrderState(redis, lock_ttl_ms=300, lock_wait_s=1.0)
    async with state.locked_read("s1", "run-1", None) as held:
        # Redis goes away (renewals fail) and comes back; meanwhile another executor took the lock.
        await asyncio.to_thread(redis_server.stop, kill=True)
        await asyncio.to_thread(redis_server.start, appendonly=False)
        await eventually(lambda: _set_when_up(redis, keys.lock_key("s1"), "another-executor"), timeout=5)
        await eventually(lambda: getattr(held, "lost", False), timeout=5)
        with pytest.raises(LockLost):
            held.ensure_held()
    assert await redis.get(keys.lock_key("s1")) == b"another-executor"


async def test_no_order_is_sent_after_the_lock_is_lost(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                       settings) -> None:
    run = await new_run(sim, engine, redis)
    async with running_executor(settings) as service:
        sim.set_faults(latency_ms=1500, routes=["orders"])  # the entry's tag lookup is slow
        await enqueue(redis, run.buy())
        await eventually(lambda: redis.exists(keys.lock_key(run.sid)))
        # The lock expires and another executor takes it while the lookup is in flight.
        await redis.set(keys.lock_key(run.sid), "another-executor")
        await eventually(lambda: not service.consumer._inflight, timeout=10)
        assert broker_orders(sim, run.tag("entry")) == []
        assert (await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP))["pending"] == 1
        sim.set_faults()
        await redis.delete(keys.lock_key(run.sid))
        await eventually(lambda: bought(redis, run), timeout=10)
    assert len(broker_orders(sim, run.tag("entry"))) == 1


async def _set_when_up(redis: Redis, key: str, value: str) -> bool:
    try:
        return bool(await redis.set(key, value))
    except RedisError as error:  # restarting
        raise AssertionError(str(error)) from error


async def _dead(redis: Redis, count: int) -> list:
    entries = await redis.xrange(keys.ORDERS_DEAD_STREAM)
    assert len(entries) >= count, entries
    return entries
