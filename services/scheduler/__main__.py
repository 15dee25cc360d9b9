"""Run the scheduler: `python -m services.scheduler`.

Contract: every member of `schedule` is moved to `queue:orders` exactly once,
when due (score <= now), by one Lua script (ZREM + XADD); any number of
replicas may run. The scheduler sleeps until the next due score, wakes early
on a `schedule:wakeup` publish, and never sleeps longer than max_sleep_s.
Lateness (due -> enqueued) is the `scheduler_lateness_seconds` histogram.
At start and after a Redis restart it rebuilds the schedule of running
strategies from Postgres (see `rebuild.py` for missed events and the grace
window); while Postgres is down it keeps moving what Redis holds.
"""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy.ext.asyncio import create_async_engine

from libs.service.health import HealthServer
from libs.service.lifecycle import Shutdown, supervise
from libs.service.logging import configure_logging, get_logger
from libs.service.redis_client import connect_redis
from libs.trading.calendar import MarketCalendar
from services.scheduler.service import Scheduler
from services.scheduler.settings import SchedulerSettings


async def serve(settings: SchedulerSettings) -> int:
    """Run until SIGTERM; return the exit code."""
    log = get_logger("scheduler")
    shutdown = Shutdown()
    shutdown.install()
    redis = connect_redis(settings, health_check_interval=5)
    engine = create_async_engine(settings.database_url, pool_pre_ping=True, pool_size=2)
    scheduler = Scheduler(settings, redis, engine, MarketCalendar(settings.market_calendar))

    async def redis_ready() -> None:
        await redis.ping()

    health = HealthServer(settings.health_host, settings.health_port, service="scheduler",
                          checks={"redis": redis_ready})
    port = await health.start()
    log.info("scheduler started", health_port=port, calendar=settings.market_calendar,
             grace_s=settings.grace_s, batch_size=settings.batch_size,
             preopen_check_time=settings.preopen_check_time.isoformat(),
             token_check=scheduler.gateway is not None)
    try:
        code = await supervise(scheduler.run(), scheduler.stop, shutdown, name="scheduler",
                               grace_s=settings.shutdown_grace_s, log=log)
    finally:
        await health.stop()
        if scheduler.gateway is not None:
            scheduler.gateway.close()
        await redis.aclose()
        await engine.dispose()
    log.info("scheduler stopped", moved=scheduler.mover.moved_total, rebuilds=scheduler.rebuilds,
             signal=shutdown.signal_name, exit_code=code)
    return code


def main() -> None:
    """Read settings once, configure logging, run."""
    settings = SchedulerSettings()
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
