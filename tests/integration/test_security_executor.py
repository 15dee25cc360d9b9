"""Issue 13 items 2(b), 15 and 16(b): what the executor refuses, and an exit that waits for its pending entry.

An in-process executor against real Redis, Postgres and the Kite simulator.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.schema import keys
from libs.schema.models import StoplossEvent, StrategyStatus, event_to_json
from libs.schema.tables import Strategy
from libs.trading.calendar import IST
from libs.trading.runs import config_for, load_run, plan_run
from services.executor.consumer import ensure_group
from tests.integration.executor_support import (
    CALENDAR,
    Run,
    enqueue,
    executor_settings,
    fake_scheduler,
    new_account,
    order_logs,
    running_executor,
    start_run,
    strategy_row,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin

pytestmark = pytest.mark.timeout(60)


async def _dead_reasons(redis: Redis) -> list[str]:
    return [f[b"reason"].decode() for _i, f in await redis.xrange(keys.ORDERS_DEAD_STREAM)]


async def test_events_no_producer_of_the_run_made_are_refused_and_dead_lettered(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, redis_url: str, clean_db: str) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    forged = [
        run.buy(),  # the run's own BUY, hours before its time (someone moved it, or wrote it)
        run.buy(trigger_time=datetime.now(UTC)),  # "buy now"
        run.sell(run_id="2020-01-01T00:00:00.000000+00:00"),  # not the loaded run
        StoplossEvent(strategy_id=run.config.strategy_id, run_id=run.config.run_id,
                      trading_day=run.plan.trading_day, trigger_price=1.0),  # no listener fired it
        run.sell(metadata={"square_off": True}),  # no user asked for it
    ]
    for event in forged:  # raw XADD: no marker, as a local attacker would write them
        await redis.xadd(keys.ORDERS_STREAM, {"event": event_to_json(event)})
    settings = executor_settings(redis_url, clean_db, sim.base_url, event_early_tolerance_s=2.0)
    async with running_executor(settings):
        async def all_dead() -> list[str]:
            reasons = await _dead_reasons(redis)
            assert len(reasons) == len(forged), reasons
            return reasons
        reasons = await eventually(all_dead, timeout=15)
    assert all(r.startswith("refused: ") for r in reasons), reasons
    for why in ("before its scheduled time", "is not a time of the run's schedule", "loaded run is",
                "stop-loss marker", "square-off marker"):
        assert sum(why in r for r in reasons) == 1, (why, reasons)
    assert sim.orders(api_key=run.account.api_key) == []
    assert await redis.exists(keys.strategy_key(run.sid))  # the real run is untouched: no ABORT
    assert (await strategy_row(engine, run)).status == StrategyStatus.running


async def test_only_a_retry_carries_retry_of(redis: Redis, engine: AsyncEngine, sim: SimAdmin, redis_url: str,
                                             clean_db: str) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    async with running_executor(executor_settings(redis_url, clean_db, sim.base_url)):
        await enqueue(redis, run.buy())

        async def logged() -> list:
            rows = await order_logs(engine, run)
            assert len(rows) == 1, rows
            return rows
        row = (await eventually(logged, timeout=15))[0]
    assert row.status == "success" and row.request_payload["attempt"] == 1
    assert "retry_of" not in row.request_payload


async def test_a_sell_waits_for_the_buy_a_dead_consumer_holds(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                              redis_url: str, clean_db: str) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis), quantity=2)
    await ensure_group(redis, keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
    await enqueue(redis, run.buy())
    # Another executor read the BUY and is about to die: its heartbeat runs out in 1.5 s.
    await redis.xreadgroup(keys.EXECUTORS_GROUP, "doomed", {keys.ORDERS_STREAM: ">"}, count=1)
    await redis.set(keys.consumer_alive_key("doomed"), "1", px=1500)
    await enqueue(redis, run.sell())
    # A claim by idle time would take 60 s: only liveness can hand the BUY over in time.
    settings = executor_settings(redis_url, clean_db, sim.base_url, claim_idle_ms=60_000, heartbeat_ttl_ms=900)
    async with running_executor(settings), fake_scheduler(redis):
        async def exited() -> bool:
            return (await strategy_row(engine, run)).status == StrategyStatus.exited
        await eventually(exited, timeout=25, interval=0.2)
    assert [o["status"] for o in sim.orders(tag=run.tag("entry"))] == ["COMPLETE"]
    assert [o["status"] for o in sim.orders(tag=run.tag("exit"))] == ["COMPLETE"]
    rows = await order_logs(engine, run)
    waits = [r for r in rows if r.status == "skipped" and (r.response_payload or {}).get("entry_waits")]
    assert waits, [(r.event_type, r.status, r.response_payload) for r in rows]


async def test_an_entry_that_comes_after_sell_time_ends_the_run_without_trading(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, redis_url: str, clean_db: str) -> None:
    now = datetime.now(IST).replace(microsecond=0)
    if not timedelta(minutes=2) < now - now.replace(hour=0, minute=0, second=0, microsecond=0) \
            < timedelta(hours=23, minutes=58):
        pytest.skip("the run's times must fall on one IST day")
    account = await new_account(sim, engine, redis)
    sid, started_at = uuid.uuid4(), datetime.now(UTC) - timedelta(seconds=40)
    async with engine.begin() as conn:
        await conn.execute(insert(Strategy).values(
            id=sid, user_id=account.user_id, symbol="INFY", buy_time=(now - timedelta(seconds=30)).time(),
            sell_time=(now - timedelta(seconds=10)).time(), stop_loss=1.0, quantity=1, status="running",
            started_at=started_at))
        row = (await conn.execute(select(Strategy).where(Strategy.id == sid))).one()
    config = config_for(row, api_key_fp=account.api_key_fp)
    plan = plan_run(config, CALENDAR, started_at)
    await load_run(redis, config, plan)
    run = Run(config, plan, account)
    await enqueue(redis, run.buy())  # claimed only now, after its run's sell time
    async with running_executor(executor_settings(redis_url, clean_db, sim.base_url, event_early_tolerance_s=2.0)):
        async def failed() -> bool:
            return (await strategy_row(engine, run)).status == StrategyStatus.failed
        await eventually(failed, timeout=15, interval=0.2)
    assert "before sell_time" in (await strategy_row(engine, run)).failure_reason
    assert sim.orders(api_key=account.api_key) == []
    assert not await redis.exists(keys.strategy_key(run.sid))
