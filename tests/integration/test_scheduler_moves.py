"""The scheduler moves each due event to queue:orders exactly once, precisely on time."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from pathlib import Path

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from libs.schema import keys
from libs.schema.models import BuyEvent, event_to_json
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import schedule_event
from services.scheduler.mover import trim_acked_orders
from services.scheduler.service import Scheduler
from services.scheduler.settings import SchedulerSettings
from tests.integration.pipeline_support import engine_for, run_service, stream_members
from tests.support.eventually import eventually


def buy_event(due_ms: int) -> BuyEvent:
    moment = datetime.fromtimestamp(due_ms / 1000, UTC)
    return BuyEvent(strategy_id=uuid.uuid4(), run_id=moment.isoformat(), trading_day=date.today(),
                    trigger_time=moment)


@asynccontextmanager
async def running_scheduler(redis_url: str, database_url: str, **overrides: object) -> AsyncIterator[Scheduler]:
    """Run a Scheduler in this event loop with its own Redis client."""
    settings = SchedulerSettings(redis_url=redis_url, database_url=database_url, **overrides)
    client = Redis.from_url(redis_url)
    engine = engine_for(database_url)
    scheduler = Scheduler(settings, client, engine, MarketCalendar("always_open"))
    task = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        await engine.dispose()


def lateness_count() -> float:
    return REGISTRY.get_sample_value("scheduler_lateness_seconds_count") or 0.0


async def test_due_events_move_once_with_two_in_process_schedulers(redis: Redis, redis_url: str,
                                                                   clean_db: str) -> None:
    now_ms = int(time.time() * 1000)
    events = {event_to_json(buy_event(now_ms + i % 400)): now_ms + i % 400 for i in range(1200)}
    await redis.zadd(keys.SCHEDULE, events)
    async with running_scheduler(redis_url, clean_db, batch_size=50), \
            running_scheduler(redis_url, clean_db, batch_size=50):
        await eventually(_stream_len_is(redis, len(events)), timeout=5)
    # Both schedulers have stopped: a duplicate, had there been one, is on the stream now.
    members = await stream_members(redis)
    assert len(members) == len(events)
    assert set(members) == set(events)
    assert await redis.zcard(keys.SCHEDULE) == 0


def _stream_len_is(redis: Redis, n: int):  # small check factory
    async def check() -> bool:
        return await redis.xlen(keys.ORDERS_STREAM) >= n
    return check


async def test_due_events_move_once_with_two_scheduler_processes(redis: Redis, redis_url: str, clean_db: str,
                                                                 tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_url, "DATABASE_URL": clean_db, "TICKWISE_BATCH_SIZE": "20"}
    with run_service("services.scheduler", env, tmp_path, "sched-a") as first, \
            run_service("services.scheduler", env, tmp_path, "sched-b") as second:
        now_ms = int(time.time() * 1000) + 200
        events = {event_to_json(buy_event(now_ms + i % 300)): now_ms + i % 300 for i in range(600)}
        await redis.zadd(keys.SCHEDULE, events)
        await eventually(_stream_len_is(redis, len(events)), timeout=10)
        assert first.stop() == 0
        assert second.stop() == 0
    members = await stream_members(redis)
    assert len(members) == len(events)
    assert set(members) == set(events)
    for service in (first, second):
        assert '"scheduler stopped"' in service.log_text()


async def _listening_for_wakeups(redis: Redis) -> bool:
    # The scheduler is up and subscribed: a publish now reaches it.
    return (await redis.pubsub_numsub(keys.SCHEDULE_WAKEUP_CHANNEL))[0][1] >= 1


async def test_event_is_enqueued_within_100ms_of_due_and_lateness_recorded(redis: Redis, redis_url: str,
                                                                           clean_db: str) -> None:
    async with running_scheduler(redis_url, clean_db):
        await eventually(lambda: _listening_for_wakeups(redis), timeout=5)
        before = lateness_count()
        due_ms = int(time.time() * 1000) + 300
        await schedule_event(redis, buy_event(due_ms), due_ms)
        await eventually(_stream_len_is(redis, 1), timeout=2, interval=0.001)
        seen_ms = time.time() * 1000
        entries = await redis.xrange(keys.ORDERS_STREAM)
        enqueued_ms = int(entries[0][0].split(b"-")[0])
        assert due_ms <= enqueued_ms <= due_ms + 100, (enqueued_ms - due_ms)
        assert seen_ms >= due_ms
        assert lateness_count() == before + 1


async def test_event_added_without_publish_is_still_moved_within_max_sleep(redis: Redis, redis_url: str,
                                                                           clean_db: str) -> None:
    async with running_scheduler(redis_url, clean_db):
        await eventually(lambda: _listening_for_wakeups(redis), timeout=5)
        due_ms = int(time.time() * 1000) + 50
        await redis.zadd(keys.SCHEDULE, {event_to_json(buy_event(due_ms)): due_ms})
        await eventually(_stream_len_is(redis, 1), timeout=2, interval=0.001)
        enqueued_ms = int((await redis.xrange(keys.ORDERS_STREAM))[0][0].split(b"-")[0])
        assert due_ms <= enqueued_ms <= due_ms + 150


async def test_future_event_is_not_moved_early(redis: Redis, redis_url: str, clean_db: str) -> None:
    async with running_scheduler(redis_url, clean_db):
        due_ms = int(time.time() * 1000) + 2000
        await schedule_event(redis, buy_event(due_ms), due_ms)
        await asyncio.sleep(0.3)  # several wake-ups have passed; nothing may move before due
        assert await redis.xlen(keys.ORDERS_STREAM) == 0
        assert await redis.zcard(keys.SCHEDULE) == 1


async def test_due_events_keep_moving_while_postgres_is_down(redis: Redis, redis_url: str) -> None:
    from deploy.local.procs import free_port

    dead_db = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/tickwise"
    async with running_scheduler(redis_url, dead_db, rebuild_retry_max_s=0.5) as scheduler:
        due_ms = int(time.time() * 1000) + 100
        await schedule_event(redis, buy_event(due_ms), due_ms)
        await eventually(_stream_len_is(redis, 1), timeout=3)
        assert scheduler.rebuilds == 0  # still retrying the rebuild, yet the BUY went out on time


async def test_acked_events_are_trimmed_from_the_queue_and_nothing_else(redis: Redis, redis_url: str,
                                                                        clean_db: str) -> None:
    """queue:orders would otherwise keep every event ever scheduled."""
    await redis.xgroup_create(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, id="0", mkstream=True)
    ids = [await redis.xadd(keys.ORDERS_STREAM, {"event": f"e{i}"}) for i in range(5)]
    await redis.xreadgroup(keys.EXECUTORS_GROUP, "c1", {keys.ORDERS_STREAM: ">"}, count=3)
    await redis.xack(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, ids[0], ids[2])  # ids[1] still pending
    async with running_scheduler(redis_url, clean_db, trim_interval_s=0.05):
        await eventually(lambda: _stream_ids(redis, ids[1:]))
        await redis.xack(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, ids[1])
        await eventually(lambda: _stream_ids(redis, ids[2:]))  # ids[3:] were never delivered: kept


async def test_without_a_consumer_group_nothing_is_trimmed(redis: Redis, redis_url: str, clean_db: str) -> None:
    ids = [await redis.xadd(keys.ORDERS_STREAM, {"event": f"e{i}"}) for i in range(3)]
    async with running_scheduler(redis_url, clean_db, trim_interval_s=0.01) as scheduler:
        await eventually(lambda: scheduler.rebuilds >= 1)
        assert await trim_acked_orders(redis) == 0
    assert [i for i, _ in await redis.xrange(keys.ORDERS_STREAM)] == ids


async def _stream_ids(redis: Redis, expected: list[bytes]) -> bool:
    return [i for i, _ in await redis.xrange(keys.ORDERS_STREAM)] == expected
