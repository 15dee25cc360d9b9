"""The scheduler rebuilds the schedule of running strategies from Postgres."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import select, text, update

from libs.schema import keys
from libs.schema.models import (
    EventType,
    OrderLogStatus,
    Position,
    RuntimeState,
    StrategyStatus,
    event_to_json,
)
from libs.schema.tables import OrderLog, Strategy
from libs.trading.tags import order_tag
from services.scheduler.rebuild import rebuild_schedule
from tests.integration.pipeline_support import (
    ALWAYS_OPEN,
    engine_for,
    insert_running_strategy,
    insert_user,
    member_strategy,
    set_position,
    start_run,
    stream_events,
)
from tests.integration.test_scheduler_moves import running_scheduler
from tests.support.eventually import eventually
from tests.support.runs import status_is


async def _status(engine, strategy_id) -> tuple[StrategyStatus, str | None]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(Strategy.status, Strategy.failure_reason)
                                  .where(Strategy.id == strategy_id))).one()
    return row.status, row.failure_reason


async def test_rebuild_after_flushall_reloads_fires_within_grace_and_fails_missed(
        redis: Redis, redis_url: str, clean_db: str) -> None:
    engine = engine_for(clean_db)
    user = await insert_user(engine)
    now = datetime.now(UTC)
    ahead = await start_run(redis, engine, user, buy_at=now + timedelta(seconds=60))
    within = await insert_running_strategy(engine, user, buy_at=now - timedelta(seconds=5))
    missed = await insert_running_strategy(engine, user, buy_at=now - timedelta(seconds=300))
    await redis.flushall()

    async with running_scheduler(redis_url, clean_db, grace_s=30):
        await eventually(lambda: _has_event(redis, within.id, EventType.BUY), timeout=5)
        await eventually(lambda: status_is(engine, missed, StrategyStatus.failed), timeout=5)

    members = await redis.zrange(keys.SCHEDULE, 0, -1)
    assert sorted(members) == sorted([event_to_json(ahead.plan.buy), event_to_json(ahead.plan.sell),
                                      event_to_json(within.plan.sell)])
    assert await redis.get(keys.strategy_key(ahead.id)) is not None
    assert await redis.get(keys.strategy_key(missed.id)) is None
    assert [member_strategy(m) for m in members].count(missed.id) == 0
    status, reason = await _status(engine, missed.row.id)
    assert status == StrategyStatus.failed and reason and reason.startswith("missed buy_time")
    assert (await _status(engine, within.row.id))[0] == StrategyStatus.running
    assert [e.event_type for e in await stream_events(redis)] == [EventType.BUY]
    assert await redis.hget(keys.broker_credentials_key(user), "api_key") == f"v1.k.apikey-{user}".encode()
    await engine.dispose()


async def test_rebuild_of_loaded_bought_run_readds_only_its_sell_once(redis: Redis, redis_url: str,
                                                                      clean_db: str) -> None:
    engine = engine_for(clean_db)
    user = await insert_user(engine)
    now = datetime.now(UTC)
    bought = await start_run(redis, engine, user, buy_at=now + timedelta(seconds=30),
                             sell_at=now + timedelta(seconds=90))
    await set_position(redis, bought.config, Position.bought)
    await redis.zrem(keys.SCHEDULE, event_to_json(bought.plan.buy), event_to_json(bought.plan.sell))
    fresh = await start_run(redis, engine, user, buy_at=now + timedelta(seconds=40))

    async with running_scheduler(redis_url, clean_db) as scheduler:
        await eventually(lambda: scheduler.rebuilds >= 1, timeout=5)

    members = await redis.zrange(keys.SCHEDULE, 0, -1)
    assert sorted(members) == sorted([event_to_json(bought.plan.sell), event_to_json(fresh.plan.buy),
                                      event_to_json(fresh.plan.sell)])
    assert await redis.xlen(keys.ORDERS_STREAM) == 0
    await engine.dispose()


async def test_stale_buy_left_in_schedule_is_not_fired_and_fails_the_strategy(
        redis: Redis, redis_url: str, clean_db: str) -> None:
    engine = engine_for(clean_db)
    user = await insert_user(engine)
    stale = await start_run(redis, engine, user, buy_at=datetime.now(UTC) - timedelta(seconds=120))

    async with running_scheduler(redis_url, clean_db, grace_s=30):
        await eventually(lambda: status_is(engine, stale, StrategyStatus.failed), timeout=5)

    assert await redis.xlen(keys.ORDERS_STREAM) == 0
    assert await redis.zcard(keys.SCHEDULE) == 0
    assert await redis.get(keys.strategy_key(stale.id)) is None
    await engine.dispose()


async def test_redis_restart_triggers_a_rebuild(redis: Redis, redis_url: str, clean_db: str,
                                                redis_server) -> None:
    engine = engine_for(clean_db)
    user = await insert_user(engine)
    run = await start_run(redis, engine, user, buy_at=datetime.now(UTC) + timedelta(seconds=60))
    async with running_scheduler(redis_url, clean_db) as scheduler:
        await eventually(lambda: scheduler.rebuilds >= 1, timeout=5)
        redis_server.stop(kill=True)
        redis_server.start(appendonly=False)
        started = time.monotonic()
        await eventually(lambda: scheduler.rebuilds >= 2, timeout=10)
        assert time.monotonic() - started < 5
        await eventually(lambda: _zcard_is(redis, 2), timeout=5)
    assert await redis.get(keys.strategy_key(run.id)) is not None
    assert sorted(await redis.zrange(keys.SCHEDULE, 0, -1)) == sorted(
        [event_to_json(run.plan.buy), event_to_json(run.plan.sell)])
    await engine.dispose()


async def _zcard_is(redis: Redis, n: int) -> bool:
    try:
        return await redis.zcard(keys.SCHEDULE) == n
    except RedisConnectionError:
        return False  # this client's connection died with the restart; the next call reconnects


async def _has_event(redis: Redis, strategy_id: str, event_type: EventType) -> bool:
    return any(str(e.strategy_id) == strategy_id and e.event_type == event_type
               for e in await stream_events(redis))


async def _waiting_on_a_lock(engine) -> bool:
    async with engine.connect() as conn:
        waiting = await conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                         " AND datname = current_database()"))
    return bool(waiting)


async def test_rebuild_never_loads_a_run_stopped_after_its_snapshot(redis: Redis, clean_db: str) -> None:
    """A stop landing between the rebuild's snapshot and its load must win: no BUY for a stopped run."""
    engine, stopper = engine_for(clean_db), engine_for(clean_db)
    user = await insert_user(engine)
    run = await insert_running_strategy(engine, user, buy_at=datetime.now(UTC) + timedelta(seconds=60))
    async with stopper.connect() as conn:
        await conn.begin()
        # The API's stop holds the row lock while it unloads Redis and commits `stopped`.
        await conn.execute(select(Strategy.id).where(Strategy.id == run.row.id).with_for_update())
        rebuild = asyncio.create_task(rebuild_schedule(engine, redis, ALWAYS_OPEN, grace_s=30))
        await eventually(lambda: _waiting_on_a_lock(stopper) if not rebuild.done() else True, timeout=5)
        await conn.execute(update(Strategy).where(Strategy.id == run.row.id)
                           .values(status=StrategyStatus.stopped, stopped_at=datetime.now(UTC)))
        await conn.commit()
    await rebuild
    assert await redis.get(keys.strategy_key(run.id)) is None
    assert await redis.zcard(keys.SCHEDULE) == 0
    await engine.dispose()
    await stopper.dispose()


async def test_rebuild_after_the_entry_keeps_the_runtime_reconciled_from_the_broker(
        redis: Redis, clean_db: str) -> None:
    """Redis lost the run after its entry filled; the executor already rebuilt runtime `bought`."""
    engine = engine_for(clean_db)
    user = await insert_user(engine)
    run = await insert_running_strategy(engine, user, buy_at=datetime.now(UTC) - timedelta(seconds=300),
                                        sell_at=datetime.now(UTC) + timedelta(seconds=300))
    entry_tag = order_tag(run.row.id, run.config.run_id, run.plan.trading_day, "entry")
    async with engine.begin() as conn:
        await conn.execute(OrderLog.__table__.insert().values(
            id=uuid.uuid4(), strategy_id=run.row.id, user_id=user, event_type=EventType.BUY,
            request_payload={}, status=OrderLogStatus.success, trading_day=run.plan.trading_day,
            broker_order_id="order-1", tag=entry_tag))
    await redis.hset(keys.runtime_key(run.id), mapping=RuntimeState.hash_fields(
        position=Position.bought, last_buy_order="order-1", updated_at=datetime.now(UTC)))

    await rebuild_schedule(engine, redis, ALWAYS_OPEN, grace_s=30)

    assert await redis.get(keys.strategy_key(run.id)) is not None
    assert await redis.hget(keys.runtime_key(run.id), "position") == b"bought"
    assert await redis.zrange(keys.SCHEDULE, 0, -1) == [event_to_json(run.plan.sell)]
    await engine.dispose()
