"""Issue 13 item 16: an executor killed while it holds a BUY must not cost the strategy its day.

A private stack with the production claim timeout (30 s idle) and two executors. One of
them takes the BUY and, before it can send it, is killed with SIGKILL; the SELL is due
seconds later. The survivor must take the BUY over by liveness (the dead one's heartbeat
runs out in ~3 s), not after 30 s, and the SELL must not fail the run meanwhile: one BUY
and one SELL at the broker, or neither with the reason; never a failed run whose BUY is
still pending.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from libs.schema import keys
from tests.e2e.harness import Stack, Trader, running_stack
from tests.fault.conftest import FAULT_ENV
from tests.support.eventually import eventually

pytestmark = pytest.mark.timeout(180)

# The fault suite's settings, but the production claim timeout: only liveness can be fast.
CRASH_ENV = {**FAULT_ENV, "TICKWISE_CLAIM_IDLE_MS": "30000", "TICKWISE_CLAIM_INTERVAL_S": "2"}


@pytest.fixture(scope="module")
def crash_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("crash-stack"), CRASH_ENV, replicas=("executor",)) as stack:
        yield stack


@pytest.fixture
async def crash_trader(crash_stack: Stack) -> AsyncIterator[Trader]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        yield await Trader(http, crash_stack).sign_up()


async def test_executor_killed_holding_a_buy_whose_sell_is_due_seconds_later(
        crash_stack: Stack, crash_trader: Trader) -> None:
    redis = aioredis.Redis.from_url(crash_stack.redis_url)
    try:
        await crash_trader.tick("HINDUNILVR", 2450)
        sid = await crash_trader.strategy("HINDUNILVR", buy_in_s=4, sell_in_s=11, stop_loss=2000, quantity=3)
        # Hold the strategy's lock so that the executor that takes the BUY is stuck with it, unsent.
        await redis.set(keys.lock_key(sid), "test-holds-the-lock", px=30_000)

        async def holder() -> str | None:
            pending = await redis.xpending_range(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, "-", "+", 10)
            return pending[0]["consumer"].decode() if pending else None

        consumer = await eventually(holder, timeout=20, interval=0.05, message="no executor took the BUY")
        os.kill(int(consumer.split("-")[-2]), signal.SIGKILL)
        await redis.delete(keys.lock_key(sid))

        async def ended() -> dict:
            row = await crash_trader.strategy_row(sid)
            assert row["status"] in ("exited", "failed"), row
            return row

        row = await eventually(ended, timeout=60, interval=0.3)
        await asyncio.sleep(1)  # room for a wrong late order to show up
        sides = sorted(o["transaction_type"] for o in await crash_trader.broker_orders())
        if row["status"] == "exited":
            assert sides == ["BUY", "SELL"], sides
        else:
            assert sides == [] and "before sell_time" in (row["failure_reason"] or ""), (row, sides)
        assert row["status"] == "exited", row  # with a ~3 s heartbeat, the BUY is placed well before the SELL
    finally:
        await redis.aclose()
        crash_stack.restart("executor")
