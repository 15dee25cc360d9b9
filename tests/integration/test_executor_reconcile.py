"""Runtime rebuilt from the broker (start, FLUSHALL, restart, partial fills) and the shared order-rate limit."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.local.procs import RedisServer
from libs.broker.kite_rest import KiteOrderClient
from libs.schema import keys
from libs.schema.models import ControlMessage, Position, RuntimeState, StrategyConfig, StrategyStatus
from libs.trading.runs import load_run, plan_run, run_id_for
from services.executor.credentials import CredentialStore
from services.executor.reconcile import Reconciler
from services.executor.state import OrderState
from tests.integration.executor_support import (
    BOX,
    CALENDAR,
    Run,
    broker_orders,
    enqueue,
    new_account,
    order_logs,
    running_executor,
    runtime,
    start_run,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin
from tests.support.runs import status_is

pytestmark = pytest.mark.timeout(60)


async def place_at_broker(sim: SimAdmin, run: Run, intent: str, side: str, quantity: int = 1) -> str:
    """Place an order with the run's tag directly, as an executor that then lost Redis would have."""
    broker = KiteOrderClient(sim.base_url)
    try:
        return await broker.place_market_order(run.account.api_key, run.account.access_token, symbol="INFY",
                                                exchange="NSE", transaction_type=side, quantity=quantity,
                                                product="MIS", tag=run.tag(intent))
    finally:
        await broker.aclose()


async def position_is(redis: Redis, run: Run, position: Position) -> bool:
    return (await runtime(redis, run)).position == position


async def test_start_rebuilds_runtime_and_ends_runs_already_exited(redis: Redis, engine: AsyncEngine,
                                                                   sim: SimAdmin, settings) -> None:
    account = await new_account(sim, engine, redis)
    holding = await start_run(engine, redis, account)
    exited = await start_run(engine, redis, account)
    entry_id = await place_at_broker(sim, holding, "entry", "BUY")
    await place_at_broker(sim, exited, "entry", "BUY")
    await place_at_broker(sim, exited, "exit", "SELL")
    async with running_executor(settings):
        state = await runtime(redis, holding)
        assert state.position == Position.bought and state.last_buy_order == entry_id
        assert not await redis.exists(keys.strategy_key(exited.sid))
        await eventually(lambda: status_is(engine, exited, StrategyStatus.exited))
        await enqueue(redis, holding.buy())
        await eventually(lambda: _logs(engine, holding, 1))
    assert len(broker_orders(sim, holding.tag("entry"))) == 1
    assert (await order_logs(engine, holding))[0].status.value == "skipped"


async def test_start_rebuilds_the_shares_held_from_partial_fills_and_the_exit_sells_them(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, settings) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis), quantity=8)
    sim.set_liquidity(depth_quantity=1, cancel_unfilled_market=True)  # five shares a side, the rest cancelled
    sim.ticks(("INFY", 1500.0))
    await place_at_broker(sim, run, "entry", "BUY", quantity=8)  # fills 5, then CANCELLED
    sim.set_liquidity(depth_quantity=500, cancel_unfilled_market=False)
    await place_at_broker(sim, run, "exit", "SELL", quantity=3)
    await eventually(lambda: [o["status"] for o in broker_orders(sim, run.tag("exit"))] == ["COMPLETE"])
    async with running_executor(settings):
        state = await runtime(redis, run)
        assert (state.position, state.filled_quantity) == (Position.bought, 2)  # 5 bought - 3 sold
        await enqueue(redis, run.sell())
        await eventually(lambda: _logs(engine, run, 1))
    sells = [(o["quantity"], o["status"], o["filled_quantity"]) for o in broker_orders(sim, run.tag("exit"))]
    assert sells == [(3, "COMPLETE", 3), (2, "COMPLETE", 2)]
    assert [o["filled_quantity"] for o in broker_orders(sim, run.tag("entry"))] == [5]
    assert not await redis.exists(keys.strategy_key(run.sid))


async def test_a_stale_runtime_after_a_partly_filled_exit_never_sells_twice(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, settings) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis), quantity=8)
    sim.ticks(("INFY", 1500.0))
    async with running_executor(settings):
        await place_at_broker(sim, run, "entry", "BUY", quantity=8)
        # An executor sent the exit (marking it), the exchange filled 5 and cancelled 3, and the
        # executor died before its commit: runtime still says 8 held.
        sim.set_liquidity(depth_quantity=1, cancel_unfilled_market=True)
        await redis.set(keys.exit_attempt_key(run.sid, run.config.run_id), "1", ex=3600)
        await place_at_broker(sim, run, "exit", "SELL", quantity=8)
        sim.set_liquidity(depth_quantity=500, cancel_unfilled_market=False)
        await redis.hset(keys.runtime_key(run.sid), mapping=RuntimeState.hash_fields(
            position=Position.bought, filled_quantity=8, updated_at=datetime.now(UTC)))
        await enqueue(redis, run.sell())

        async def logged() -> list:
            return await order_logs(engine, run)

        rows = await eventually(logged, timeout=20)
    sells = [(o["quantity"], o["status"], o["filled_quantity"]) for o in broker_orders(sim, run.tag("exit"))]
    assert sells == [(8, "CANCELLED", 5), (3, "COMPLETE", 3)]
    assert rows[0].status.value == "success" and rows[0].request_payload["order"]["quantity"] == 3
    assert not await redis.exists(keys.strategy_key(run.sid))


async def test_flushall_rebuilds_runtime_from_the_broker_without_a_second_buy(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, settings) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    async with running_executor(settings):
        await enqueue(redis, run.buy())
        await eventually(lambda: position_is(redis, run, Position.bought))
        await eventually(lambda: _logs(engine, run, 1))
        await redis.flushall()
        # Runtime and the credential hash come back from the broker and Postgres.
        await eventually(lambda: position_is(redis, run, Position.bought), timeout=10)
        assert await redis.exists(keys.broker_credentials_key(run.account.user_id))
        # The scheduler reloads the run with a fresh runtime and fires BUY again:
        # the tag lookup finds the filled entry, nothing new reaches the broker.
        await load_run(redis, run.config, run.plan)
        await enqueue(redis, run.buy())
        await eventually(lambda: position_is(redis, run, Position.bought))
        rows = await eventually(lambda: _logs(engine, run, 2))
        assert rows[1].response_payload["found_by_tag"] is True
        await enqueue(redis, run.sell())
        await eventually(lambda: status_is(engine, run, StrategyStatus.exited))
    assert len(broker_orders(sim, run.tag("entry"))) == 1
    assert len(broker_orders(sim, run.tag("exit"))) == 1


async def test_redis_restart_triggers_reconciliation(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                     settings, redis_server: RedisServer) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    async with running_executor(settings):
        await enqueue(redis, run.buy())
        await eventually(lambda: position_is(redis, run, Position.bought))
        await eventually(lambda: _logs(engine, run, 1))
        await asyncio.to_thread(redis_server.stop, kill=True)
        await asyncio.to_thread(redis_server.start, appendonly=False)
        await eventually(lambda: _safe(position_is(redis, run, Position.bought)), timeout=15)
        await load_run(redis, run.config, run.plan, runtime=await runtime(redis, run))
        await enqueue(redis, run.sell())
        await eventually(lambda: status_is(engine, run, StrategyStatus.exited), timeout=10)
    assert len(broker_orders(sim, run.tag("entry"))) == 1
    assert len(broker_orders(sim, run.tag("exit"))) == 1


async def test_one_account_stays_under_ten_orders_per_second(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                             settings) -> None:
    account = await new_account(sim, engine, redis)
    runs = [await start_run(engine, redis, account) for _ in range(25)]
    async with running_executor(settings), running_executor(settings):
        for run in runs:
            await enqueue(redis, run.buy())
        for run in runs:
            await eventually(lambda run=run: position_is(redis, run, Position.bought), timeout=15)
    orders = sim.orders(api_key=account.api_key)
    assert len(orders) == 25
    times = sorted(o["received_at_monotonic"] for o in orders)
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 10
    assert times[-1] - times[0] >= 2.0  # 25 orders at 10/s need at least two full windows


async def _safe(check: object) -> bool:
    try:
        return await check  # type: ignore[misc]
    except RedisError as error:  # Redis is restarting
        raise AssertionError(str(error)) from error


async def _logs(engine: AsyncEngine, run: Run, count: int) -> list:
    rows = await order_logs(engine, run)
    assert len(rows) == count, rows
    return rows


async def test_reconciled_positions_are_announced_to_the_listeners(redis: Redis, engine: AsyncEngine,
                                                                   sim: SimAdmin, settings) -> None:
    account = await new_account(sim, engine, redis)
    holding = await start_run(engine, redis, account)
    exited = await start_run(engine, redis, account)
    await place_at_broker(sim, holding, "entry", "BUY")
    await place_at_broker(sim, exited, "entry", "BUY")
    await place_at_broker(sim, exited, "exit", "SELL")
    async with running_executor(settings):
        assert (await runtime(redis, holding)).position == Position.bought
        # A listener that loaded the run before the rebuild must learn the position from the
        # control stream, or the stop-loss of the rebuilt position goes unwatched.
        messages = await _position_messages(redis)
        assert (holding.sid, "bought", holding.config.run_id) in messages
        assert (exited.sid, "sold", exited.config.run_id) in messages


async def test_reconciliation_leaves_a_run_restarted_meanwhile_alone(redis: Redis, redis_url: str,
                                                                      engine: AsyncEngine, sim: SimAdmin) -> None:
    account = await new_account(sim, engine, redis)
    holding, exited = await start_run(engine, redis, account), await start_run(engine, redis, account)
    await place_at_broker(sim, holding, "entry", "BUY")
    await place_at_broker(sim, exited, "entry", "BUY")
    await place_at_broker(sim, exited, "exit", "SELL")
    restarted = {run.sid: run.config.model_copy(update={"run_id": run_id_for(datetime.now(UTC))})
                 for run in (holding, exited)}

    def stop_and_restart(_configs: object) -> None:
        # Both strategies are stopped and started again right after reconciliation read
        # their (old) configs: a new run with a fresh runtime is loaded for each.
        async def restart() -> None:
            client = Redis.from_url(redis_url)
            try:
                for config in restarted.values():
                    await load_run(client, config, plan_run(config, CALENDAR, datetime.fromisoformat(config.run_id)))
            finally:
                await client.aclose()
        thread = threading.Thread(target=asyncio.run, args=(restart(),))
        thread.start()
        thread.join()

    broker = KiteOrderClient(sim.base_url)
    state = OrderState(redis, lock_ttl_ms=2000, lock_wait_s=2.0)
    reconciler = Reconciler(redis, None, CredentialStore(redis, BOX, ttl_s=60), broker, state, CALENDAR,
                            pg_timeout_s=1.0, on_configs=stop_and_restart)
    try:
        await reconciler.run("test")
    finally:
        await broker.aclose()
    # The old run's fill must not land on the new run's runtime, nor its exit unload the new run.
    assert (await runtime(redis, holding)).position == Position.none
    for sid, config in restarted.items():
        assert StrategyConfig.model_validate_json(await redis.get(keys.strategy_key(sid))).run_id == config.run_id
    assert await redis.xlen(keys.ORDER_LOGS_STREAM) == 0


async def _position_messages(redis: Redis) -> list[tuple[str, str | None, str | None]]:
    out = []
    for _id, fields in await redis.xrange(keys.CONTROL_STREAM):
        msg = ControlMessage.model_validate_json(fields[b"event"])
        if msg.action == "position":
            out.append((str(msg.strategy_id), msg.position.value if msg.position else None, msg.run_id))
    return out
