"""An exit redelivered after a partial fill whose commit was lost sells only the remainder, once."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.broker.kite_rest import KiteOrderClient
from libs.schema import keys
from libs.schema.models import Position, RuntimeState
from tests.integration.executor_support import (
    Run,
    broker_orders,
    enqueue,
    new_account,
    order_logs,
    running_executor,
    start_run,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin

pytestmark = pytest.mark.timeout(60)


async def _place(sim: SimAdmin, run: Run, intent: str, side: str, quantity: int) -> None:
    broker = KiteOrderClient(sim.base_url)
    try:
        await broker.place_market_order(run.account.api_key, run.account.access_token, symbol="INFY",
                                        exchange="NSE", transaction_type=side, quantity=quantity, product="MIS",
                                        tag=run.tag(intent))
    finally:
        await broker.aclose()


async def test_a_stale_runtime_after_a_partly_filled_exit_never_sells_twice(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, settings) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis), quantity=8)
    sim.ticks(("INFY", 1500.0))
    async with running_executor(settings):
        await _place(sim, run, "entry", "BUY", 8)
        # An executor sent the exit (marking it), the exchange filled 5 and cancelled 3, and the
        # executor died before its commit: runtime still says 8 held.
        sim.set_liquidity(depth_quantity=1, cancel_unfilled_market=True)
        await redis.set(keys.exit_attempt_key(run.sid, run.config.run_id), "1", ex=3600)
        await _place(sim, run, "exit", "SELL", 8)
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
