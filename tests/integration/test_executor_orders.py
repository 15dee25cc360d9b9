"""Executor order path against real Redis, Postgres and the Kite simulator (in-process executor)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from kiteconnect import KiteConnect
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.schema import keys
from libs.schema.models import Position, StrategyStatus, event_to_json
from libs.trading.runs import unload_run
from services.executor.service import ExecutorService
from tests.integration.executor_support import (
    Run,
    broker_orders,
    enqueue,
    executor_settings,
    new_account,
    order_logs,
    running_executor,
    runtime,
    start_run,
    strategy_row,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin
from tests.support.runs import position_is, status_is

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def executor(redis: Redis, clean_db: str, sim: SimAdmin, redis_url: str) -> AsyncIterator[ExecutorService]:
    async with running_executor(executor_settings(redis_url, clean_db, sim.base_url)) as service:
        yield service


async def new_run(sim: SimAdmin, engine: AsyncEngine, redis: Redis, **kwargs: object) -> Run:
    account = await new_account(sim, engine, redis)
    return await start_run(engine, redis, account, **kwargs)  # type: ignore[arg-type]


async def logs_of(engine: AsyncEngine, run: Run, count: int) -> list:
    async def check() -> list:
        rows = await order_logs(engine, run)
        assert len(rows) == count, rows
        return rows
    return await eventually(check, timeout=10)


async def test_buy_then_sell_places_one_order_each_and_exits(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                             executor: ExecutorService) -> None:
    run = await new_run(sim, engine, redis, quantity=3)
    await enqueue(redis, run.buy())
    await eventually(lambda: position_is(redis, run, Position.bought))
    state = await runtime(redis, run)
    entry = broker_orders(sim, run.tag("entry"))
    assert len(entry) == 1 and entry[0]["transaction_type"] == "BUY" and entry[0]["quantity"] == 3
    assert state.last_buy_order == entry[0]["order_id"] and state.last_price == entry[0]["average_price"]

    await enqueue(redis, run.sell())
    await eventually(lambda: _unloaded(redis, run))
    exits = broker_orders(sim, run.tag("exit"))
    assert len(exits) == 1 and exits[0]["transaction_type"] == "SELL"
    rows = await logs_of(engine, run, 2)
    assert [(r.event_type.value, r.status.value) for r in rows] == [("BUY", "success"), ("SELL", "success")]
    assert rows[1].broker_order_id == exits[0]["order_id"] and rows[1].tag == run.tag("exit")
    await eventually(lambda: status_is(engine, run, StrategyStatus.exited))
    assert not await redis.sismember(keys.symbol_strategies_key("INFY"), run.sid)
    payloads = str([(r.request_payload, r.response_payload) for r in rows])
    assert run.account.api_key not in payloads and run.account.access_token not in payloads


async def test_duplicate_buy_event_places_one_order(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                    executor: ExecutorService) -> None:
    run = await new_run(sim, engine, redis)
    for _ in range(3):
        await enqueue(redis, run.buy())
    rows = await logs_of(engine, run, 3)
    assert sorted(r.status.value for r in rows) == ["skipped", "skipped", "success"]
    assert len(broker_orders(sim, run.tag("entry"))) == 1
    assert (await runtime(redis, run)).position == Position.bought


async def test_stoploss_exit_cancels_pending_sell_and_a_late_sell_is_skipped(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, executor: ExecutorService) -> None:
    run = await new_run(sim, engine, redis)
    await enqueue(redis, run.buy())
    await eventually(lambda: position_is(redis, run, Position.bought))
    assert await redis.zscore(keys.SCHEDULE, event_to_json(run.plan.sell)) is not None
    await enqueue(redis, run.stoploss(price=1400.0))
    await eventually(lambda: _unloaded(redis, run))
    members = await redis.zrange(keys.SCHEDULE, 0, -1)
    assert not [m for m in members if run.sid.encode() in m], "the pending SELL must leave the schedule"
    await enqueue(redis, run.sell())
    rows = await logs_of(engine, run, 3)
    assert [(r.event_type.value, r.status.value) for r in rows] == [
        ("BUY", "success"), ("STOPLOSS", "success"), ("SELL", "skipped")]
    assert len(broker_orders(sim, run.tag("exit"))) == 1
    await eventually(lambda: status_is(engine, run, StrategyStatus.exited))


async def test_sell_after_stoploss_exit_reaches_the_broker_once(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                                executor: ExecutorService) -> None:
    run = await new_run(sim, engine, redis)
    await enqueue(redis, run.buy())
    await eventually(lambda: position_is(redis, run, Position.bought))
    await enqueue(redis, run.stoploss(price=1400.0))
    await enqueue(redis, run.sell())
    rows = await logs_of(engine, run, 3)
    assert sorted(r.status.value for r in rows) == ["skipped", "success", "success"]
    assert len(broker_orders(sim, run.tag("exit"))) == 1


async def test_rejected_buy_fails_the_strategy(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                               executor: ExecutorService) -> None:
    run = await new_run(sim, engine, redis)
    sim.set_faults(reject_rate=1.0)
    await enqueue(redis, run.buy())
    rows = await logs_of(engine, run, 1)
    assert rows[0].status.value == "failed" and rows[0].response_payload["status"] == "REJECTED"
    await eventually(lambda: status_is(engine, run, StrategyStatus.failed))
    assert "rejected" in (await strategy_row(engine, run)).failure_reason.lower()
    assert not await redis.exists(keys.strategy_key(run.sid))


async def test_square_off_exits_without_changing_a_stopped_status(redis: Redis, engine: AsyncEngine,
                                                                  sim: SimAdmin, executor: ExecutorService) -> None:
    run = await new_run(sim, engine, redis)
    await enqueue(redis, run.buy())
    await eventually(lambda: position_is(redis, run, Position.bought))
    async with engine.begin() as conn:
        from sqlalchemy import update

        from libs.schema.tables import Strategy
        await conn.execute(update(Strategy).where(Strategy.id == run.config.strategy_id).values(status="stopped"))
    await enqueue(redis, run.sell(metadata={"square_off": True}))
    await eventually(lambda: _unloaded(redis, run))
    rows = await logs_of(engine, run, 2)
    assert rows[1].status.value == "success"
    assert (await strategy_row(engine, run)).status == StrategyStatus.stopped
    assert len(broker_orders(sim, run.tag("exit"))) == 1


async def test_sell_cancels_an_entry_still_open_at_the_broker_before_ending_the_run(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, executor: ExecutorService) -> None:
    run = await new_run(sim, engine, redis)
    # The entry is still OPEN at the broker (an ambiguous BUY that has not filled yet),
    # while runtime says none: were the run just unloaded, a later fill would be held with
    # no SELL and no stop-loss left.
    kite = KiteConnect(run.account.api_key, access_token=run.account.access_token, root=sim.base_url)
    entry_id = await asyncio.to_thread(
        kite.place_order, variety="regular", exchange="NSE", tradingsymbol="INFY", transaction_type="BUY",
        quantity=1, product="MIS", order_type="LIMIT", price=1300.0, tag=run.tag("entry"))
    await enqueue(redis, run.sell())
    await eventually(lambda: _unloaded(redis, run))
    entry = broker_orders(sim, run.tag("entry"))
    assert [(o["order_id"], o["status"]) for o in entry] == [(entry_id, "CANCELLED")]
    assert broker_orders(sim, run.tag("exit")) == []
    await eventually(lambda: status_is(engine, run, StrategyStatus.failed))


async def _unloaded(redis: Redis, run: Run) -> bool:
    return not await redis.exists(keys.strategy_key(run.sid), keys.runtime_key(run.sid))


async def test_stoploss_of_an_unloaded_run_unmarks_it_so_a_reloaded_run_can_fire_again(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, executor: ExecutorService) -> None:
    run = await new_run(sim, engine, redis)
    await unload_run(redis, run.config, run.plan)  # as after Redis lost it, before the rebuild
    marker = keys.stoploss_marker_key(run.sid, run.config.run_id)
    await redis.set(marker, 1)  # the listener fired while the run was not loaded
    await enqueue(redis, run.stoploss(price=1400.0))
    rows = await logs_of(engine, run, 1)
    assert rows[0].status.value == "skipped"
    assert not await redis.exists(marker)
    assert broker_orders(sim, run.tag("exit")) == []
