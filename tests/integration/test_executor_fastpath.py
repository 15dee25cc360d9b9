"""The exit fast path: lock, reads, order slot and exit marker in one script (real Redis, simulator)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.schema import keys
from libs.schema.models import Position
from services.executor.ratelimit import OrderRateLimiter
from services.executor.state import OrderState
from tests.integration.executor_support import (
    Run,
    broker_orders,
    enqueue,
    executor_settings,
    new_account,
    running_executor,
    start_run,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin
from tests.support.runs import position_is

pytestmark = pytest.mark.timeout(60)


async def _lock_read(state: OrderState, limiter: OrderRateLimiter, run: Run, run_id: str | None = None) -> tuple:
    fp = run.account.api_key_fp
    key, args = limiter.slot_request(fp)
    async with state.locked_read(run.sid, run_id or run.config.run_id, str(run.account.user_id),
                                 (fp, key, args), 60) as held:
        return held.slot_fp, held.exit_attempted, held.credentials


async def test_slot_and_exit_marker_come_with_the_lock_only_for_a_plain_exit(redis: Redis, engine: AsyncEngine,
                                                                             sim: SimAdmin) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    state = OrderState(redis, lock_ttl_ms=2000, lock_wait_s=1.0)
    limiter = OrderRateLimiter(redis, limit=1, window_ms=60_000, max_wait_s=1.0)
    marker, rate = keys.exit_attempt_key(run.sid, run.config.run_id), keys.order_rate_key(run.account.api_key_fp)

    # Nothing bought: the handler will ask the broker first, so no slot and no marker.
    slot_fp, attempted, creds = await _lock_read(state, limiter, run)
    assert (slot_fp, attempted, await redis.exists(marker), await redis.zcard(rate)) == (None, False, 0, 0)
    assert creds is not None and creds[b"api_key_fp"].decode() == run.account.api_key_fp

    await redis.hset(keys.runtime_key(run.sid), "position", Position.bought.value)
    # An event of another run of the strategy: no slot.
    assert (await _lock_read(state, limiter, run, run_id="2000-01-01T00:00:00+00:00"))[0] is None
    # A plain exit: slot taken and marker set in the locking step.
    slot_fp, attempted, _ = await _lock_read(state, limiter, run)
    assert (slot_fp, attempted, await redis.exists(marker), await redis.zcard(rate)) == (
        run.account.api_key_fp, False, 1, 1)
    # An exit was attempted already: the next one looks the tag up, so no slot.
    slot_fp, attempted, _ = await _lock_read(state, limiter, run)
    assert (slot_fp, attempted, await redis.zcard(rate)) == (None, True, 1)
    # Window full (limit 1): no slot and no marker; the handler waits in the limiter instead.
    await redis.delete(marker)
    slot_fp, attempted, _ = await _lock_read(state, limiter, run)
    assert (slot_fp, attempted, await redis.exists(marker), await redis.zcard(rate)) == (None, False, 0, 1)
    assert not await redis.exists(keys.lock_key(run.sid))


async def test_stoploss_takes_one_slot_and_sends_one_exit(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                          redis_url: str, clean_db: str) -> None:
    settings = executor_settings(redis_url, clean_db, sim.base_url, rate_window_ms=60_000)
    async with running_executor(settings) as service:
        run = await start_run(engine, redis, await new_account(sim, engine, redis))
        await enqueue(redis, run.buy())
        await eventually(lambda: position_is(redis, run, Position.bought))
        # The BUY taught the executor the owner and the fingerprint: the exit takes the fast path.
        assert service.credentials.fingerprint_hint(str(run.account.user_id)) == run.account.api_key_fp
        await enqueue(redis, run.stoploss(price=1400.0))
        await eventually(lambda: _gone(redis, run))
        assert len(broker_orders(sim, run.tag("exit"))) == 1
        assert await redis.exists(keys.exit_attempt_key(run.sid, run.config.run_id))
        # One slot per order sent (entry + exit): the fast path did not take a second one.
        assert await redis.zcard(keys.order_rate_key(run.account.api_key_fp)) == 2


async def _gone(redis: Redis, run: Run) -> bool:
    return not await redis.exists(keys.strategy_key(run.sid), keys.runtime_key(run.sid))
