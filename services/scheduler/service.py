"""The scheduler's run loop: move due events precisely, rebuild after restarts."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from libs.schema import keys
from libs.service.backoff import Backoff
from libs.service.clock import Clock, SystemClock
from libs.service.lifecycle import sleep_unless_stopped
from libs.service.redis_client import server_run_id
from libs.trading.calendar import MarketCalendar
from services.scheduler.daily import DailyTasks
from services.scheduler.mover import DueMover, trim_acked_orders
from services.scheduler.rebuild import rebuild_schedule, sweep_stale_buys
from services.scheduler.settings import SchedulerSettings

# A lazy proxy: configure_logging() runs in main(), after this module is imported, and a
# bound logger made now would keep structlog's default (console) configuration.
log = structlog.get_logger("scheduler")


class Scheduler:
    """Own the mover loop, the wake-up subscriber, the Redis watch and the rebuilds."""

    def __init__(self, settings: SchedulerSettings, redis: Redis, engine: AsyncEngine,
                 calendar: MarketCalendar, clock: Clock | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.engine = engine
        self.calendar = calendar
        self.clock = clock or SystemClock()
        self.mover = DueMover(redis, batch_size=settings.batch_size, clock=self.clock)
        self.wakeup = asyncio.Event()
        self.stopping = asyncio.Event()
        self.daily, self.gateway = DailyTasks.build(settings, redis, async_sessionmaker(engine), calendar,
                                                    self.clock, self.stopping)
        self.rebuild_needed = asyncio.Event()
        self.rebuilds = 0
        self.redis_run_id: str | None = None

    def stop(self) -> None:
        """Ask every loop to finish."""
        self.stopping.set()
        self.wakeup.set()
        self.rebuild_needed.set()

    async def run(self) -> None:
        """Run until stop(); the stale-BUY sweep goes first so a missed BUY is never fired."""
        await self._sweep_before_moving()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.move_due_forever(), name="mover")
            tasks.create_task(self.follow_wakeups(), name="wakeups")
            tasks.create_task(self.watch_redis_restarts(), name="redis-watch")
            tasks.create_task(self.rebuild_when_needed(), name="rebuild")
            tasks.create_task(self.trim_orders_forever(), name="trim")
            tasks.create_task(self.daily.preopen_checks_forever(), name="preopen-check")
            tasks.create_task(self.daily.rearm_forever(), name="rearm")

    async def _sweep_before_moving(self) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        while not self.stopping.is_set():
            try:
                await sweep_stale_buys(self.redis, self.calendar, self.settings.grace_s)
                return
            except (RedisError, OSError) as exc:
                log.warning("redis unavailable at start; retrying", error=str(exc))
                await self._pause(backoff.next())

    async def _pause(self, seconds: float) -> None:
        await sleep_unless_stopped(self.stopping, seconds)

    async def move_due_forever(self) -> None:
        """Move due events, then sleep until the next is due, a publish, or max_sleep_s."""
        max_sleep = self.settings.max_sleep_s
        while not self.stopping.is_set():
            self.wakeup.clear()
            try:
                moved = await self.mover.move_all_due()
                if moved:
                    worst = max(m.lateness_s for m in moved)
                    log.info("events enqueued", count=len(moved), max_lateness_ms=round(worst * 1000, 2))
                    if worst > 1.0:
                        log.warning("events enqueued late", count=len(moved), max_lateness_ms=round(worst * 1000))
                wait = await self.mover.seconds_until_next_due()
            except (RedisError, OSError) as exc:
                log.warning("redis unavailable; retrying", error=str(exc))
                wait = 0.5
            sleep = max_sleep if wait is None else min(wait, max_sleep)
            if sleep > 0:
                await sleep_unless_stopped(self.wakeup, sleep)

    async def trim_orders_forever(self) -> None:
        """Trim delivered-and-acked entries from queue:orders every trim_interval_s."""
        while not self.stopping.is_set():
            await self._pause(self.settings.trim_interval_s)
            try:
                trimmed = await trim_acked_orders(self.redis)
            except (RedisError, OSError) as exc:
                log.warning("queue:orders not trimmed", error=str(exc))
                continue
            if trimmed:
                log.info("acked events trimmed", partitions=keys.partition_count(), count=trimmed)

    async def follow_wakeups(self) -> None:
        """Wake the mover whenever `schedule` gains an earlier member."""
        while not self.stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.SCHEDULE_WAKEUP_CHANNEL)
                while not self.stopping.is_set():
                    message = await pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self.wakeup.set()
            except (RedisError, OSError) as exc:
                log.warning("wake-up subscription lost; resubscribing", error=str(exc))
                await self._pause(0.5)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def watch_redis_restarts(self) -> None:
        """Ask for a rebuild at start, whenever Redis's run_id changes, and when Redis lost its data."""
        while not self.stopping.is_set():
            try:
                run_id = await server_run_id(self.redis)
                if run_id != self.redis_run_id:
                    if self.redis_run_id is not None:
                        log.warning("redis restarted; rebuilding schedule", old_run_id=self.redis_run_id,
                                    run_id=run_id)
                    self.redis_run_id = run_id
                    self.rebuild_needed.set()
                elif self.rebuilds and not self.rebuild_needed.is_set() and not await self._markers_present():
                    log.warning("redis lost its data; rebuilding schedule", run_id=run_id)
                    self.rebuild_needed.set()
            except (RedisError, OSError):
                pass  # the mover logs Redis outages; this loop just keeps looking
            await self._pause(self.settings.redis_check_interval_s)

    async def _markers_present(self) -> bool:
        # One marker per partition: in a cluster each sits on its partition's master, so
        # one master losing its data (an empty replica promoted) is seen too.
        count = keys.partition_count()
        if count == 1:
            return bool(await self.redis.exists(keys.STATE_MARKER))
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in range(count):
                pipe.exists(keys.state_marker_key(p))
            return all(await pipe.execute())

    async def _set_markers(self) -> None:
        stamp = datetime.now(UTC).isoformat()
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in range(keys.partition_count()):
                pipe.set(keys.state_marker_key(p), stamp)
            await pipe.execute()

    async def rebuild_when_needed(self) -> None:
        """Rebuild from Postgres when asked, retrying with backoff while it is down."""
        while not self.stopping.is_set():
            await self.rebuild_needed.wait()
            if self.stopping.is_set():
                return
            self.rebuild_needed.clear()
            backoff = Backoff(base=0.5, cap=self.settings.rebuild_retry_max_s)
            while not self.stopping.is_set():
                try:
                    # Marked before rebuilding: data lost during the rebuild asks for another one.
                    await self._set_markers()
                    await rebuild_schedule(self.engine, self.redis, self.calendar, grace_s=self.settings.grace_s)
                    self.rebuilds += 1
                    break
                except (SQLAlchemyError, RedisError, OSError) as exc:
                    delay = backoff.next()
                    log.warning("rebuild failed; retrying", error=str(exc), retry_in_s=delay)
                    await self._pause(delay)
