"""The fast paths: an exit's lock, reads, order slot and exit marker in one script, and a new run's
first entry sent without an order-book read (real Redis, simulator)."""

from __future__ import annotations

import asyncio

import pytest
from kiteconnect import KiteConnect
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.schema import keys
from libs.schema.models import Position
from libs.service.redis_client import server_run_id
from services.executor import metrics
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


async def test_a_new_runs_entry_takes_its_slot_with_the_lock_only_while_it_is_unsent(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis), new_run=True)
    state = OrderState(redis, lock_ttl_ms=2000, lock_wait_s=1.0)
    limiter = OrderRateLimiter(redis, limit=5, window_ms=60_000, max_wait_s=1.0)
    fp, rate = run.account.api_key_fp, keys.order_rate_key(run.account.api_key_fp)

    async def entry_read() -> tuple:
        async with state.locked_read(run.sid, run.config.run_id, str(run.account.user_id),
                                     (fp, *limiter.slot_request(fp)), entry=True) as held:
            return held.entry_unsent, held.slot_fp

    # Not reconciled yet (no trusted server): the key is deleted but does not count, and no slot.
    assert (await entry_read(), await redis.zcard(rate)) == ((False, None), 0)
    await redis.set(keys.entry_unsent_key(run.sid, run.config.run_id), "1")
    state.trusted_identity = await server_run_id(redis)
    # The first entry: unsent, and its slot comes with the lock.
    assert (await entry_read(), await redis.zcard(rate)) == ((True, fp), 1)
    # Any later one looks its tag up first: no slot here (the limiter gives it one after the lookup).
    assert (await entry_read(), await redis.zcard(rate)) == ((False, None), 1)


def _book_reads() -> float:
    return metrics.BOOK_READS.labels(intent="entry")._value.get()


async def test_a_new_runs_first_buy_is_sent_without_reading_the_book(redis: Redis, engine: AsyncEngine,
                                                                     sim: SimAdmin, redis_url: str,
                                                                     clean_db: str) -> None:
    async with running_executor(executor_settings(redis_url, clean_db, sim.base_url)):
        account = await new_account(sim, engine, redis)
        fresh = await start_run(engine, redis, account, new_run=True)
        reloaded = await start_run(engine, redis, account)  # as a rebuild reloads a run Redis lost
        unsent = keys.entry_unsent_key(fresh.sid, fresh.config.run_id)
        assert await redis.exists(unsent)
        before = _book_reads()
        await enqueue(redis, fresh.buy())
        await eventually(lambda: position_is(redis, fresh, Position.bought))
        assert (_book_reads(), await redis.exists(unsent)) == (before, 0)
        # No unsent-entry key: the BUY searches the book for its tag first.
        await enqueue(redis, reloaded.buy())
        await eventually(lambda: position_is(redis, reloaded, Position.bought))
        assert _book_reads() == before + 1
        assert [len(broker_orders(sim, run.tag("entry"))) for run in (fresh, reloaded)] == [1, 1]


async def test_a_redis_that_may_have_lost_writes_leaves_no_entry_unsearched(redis: Redis, engine: AsyncEngine,
                                                                            sim: SimAdmin, redis_url: str,
                                                                            clean_db: str) -> None:
    async with running_executor(executor_settings(redis_url, clean_db, sim.base_url)) as service:
        account = await new_account(sim, engine, redis)
        run = await start_run(engine, redis, account, new_run=True)
        unsent = keys.entry_unsent_key(run.sid, run.config.run_id)
        # An executor (re)starting against the Redis the last reconciliation saw keeps the key.
        await service.recover("start")
        assert await redis.exists(unsent)
        # The entry was sent, then Redis lost the DEL that went with it: the key is back. A
        # restart against another server identity (restart, failover, flush) forgets every one.
        kite = KiteConnect(account.api_key, root=sim.base_url)
        kite.set_access_token(account.access_token)
        sent = await asyncio.to_thread(
            kite.place_order, variety="regular", exchange="NSE", tradingsymbol=run.config.symbol,
            transaction_type="BUY", quantity=run.config.quantity, product="MIS", order_type="MARKET",
            market_protection=KiteConnect.MARKET_PROTECTION_AUTO, tag=run.tag("entry"))
        await redis.set(keys.REDIS_EPOCH, "another server")
        await service.recover("start")
        assert not await redis.exists(unsent)
        assert (await redis.get(keys.REDIS_EPOCH)).decode() == await server_run_id(redis)
        # The redelivered BUY (first delivery again on a Redis that lost its read) finds the order.
        await enqueue(redis, run.buy())
        await eventually(lambda: position_is(redis, run, Position.bought))
        assert [o["order_id"] for o in broker_orders(sim, run.tag("entry"))] == [sent]
        # An executor that has not noticed a restart yet (it trusts the old server) finds a key it
        # cannot trust: the lock-read compares the server's run_id in the same step, so it looks first.
        late = await start_run(engine, redis, account, new_run=True)
        service.state.trusted_identity = "run_id of a server that restarted since"
        before = _book_reads()
        await enqueue(redis, late.buy())
        await eventually(lambda: position_is(redis, late, Position.bought))
        assert _book_reads() == before + 1
        # The watchdog's trigger (a new run_id seen) forgets them whatever the stored identity says.
        other = await start_run(engine, redis, account, new_run=True)
        await service.recover("redis_restart")
        assert not await redis.exists(keys.entry_unsent_key(other.sid, other.config.run_id))
