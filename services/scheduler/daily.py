"""The scheduler's daily duties: the pre-open token check, re-arming repeating strategies, the halt gauge.

The scheduler runs these because it is the one process that already owns
time (the clock, the calendar) and can run as several replicas:
- Pre-open check (default 08:45 IST on trading days): every account with
  running strategies is checked with the broker's profile call; an expired
  token is recorded (`token_state=expired`, `is_valid=false`), which flags the
  account's running strategies `needs_login` in their status until a login
  stores a fresh token (the flag clears at once: status reads the state). A
  `SET NX` per account per day makes replicas check and notify once.
- Re-arm: ended runs of repeating strategies get their next trading day's run
  (`libs.trading.repeat`).
- Halt: `/metrics` shows `scheduler_operator_halt` (1 while the halt key is set)
  and the log says when it is set or cleared.
"""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Any

from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.broker.kite import KiteGateway
from libs.schema import keys
from libs.schema.models import StrategyStatus
from libs.schema.tables import Strategy
from libs.service.backoff import Backoff
from libs.service.clock import Clock
from libs.service.lifecycle import sleep_unless_stopped
from libs.service.logging import get_logger
from libs.service.secretbox import SecretBox
from libs.trading.calendar import MarketCalendar
from libs.trading.repeat import rearm_ended_runs
from libs.trading.tokens import TokenChecker, TokenState
from services.scheduler.settings import SchedulerSettings

TOKEN_CHECKS = Counter("scheduler_token_checks_total", "Pre-open token checks, by the broker's answer.", ["state"])
REARMED = Counter("scheduler_runs_rearmed_total", "Repeating strategies armed for their next trading day.")
HALT = Gauge("scheduler_operator_halt", "1 while the operator halt key is set (executors place no new entries).")
CHECK_CONCURRENCY = 16  # profile calls in flight (each account has its own Kite rate limit)

log = get_logger("scheduler")


class DailyTasks:
    """Own the pre-open check, the re-arm loop and the halt watch of one scheduler."""

    def __init__(self, settings: SchedulerSettings, redis: Redis, sessions: async_sessionmaker[AsyncSession],
                 calendar: MarketCalendar, clock: Clock, stopping: asyncio.Event,
                 checker: TokenChecker | None) -> None:
        self.settings, self.redis, self.sessions, self.calendar = settings, redis, sessions, calendar
        self.clock, self.stopping, self.checker = clock, stopping, checker
        self._halted: bool | None = None

    @classmethod
    def build(cls, settings: SchedulerSettings, redis: Redis, sessions: async_sessionmaker[AsyncSession],
              calendar: MarketCalendar, clock: Clock, stopping: asyncio.Event) -> tuple[DailyTasks, KiteGateway | None]:
        """Return the tasks and the gateway they own (close it at shutdown); no secret key: no token check."""
        if not settings.secret_key:
            log.warning("pre-open token check off: TICKWISE_SECRET_KEY is not set")
            return cls(settings, redis, sessions, calendar, clock, stopping, None), None
        gateway = KiteGateway(settings.kite_root, max_workers=CHECK_CONCURRENCY, timeout_s=settings.kite_timeout_s)
        box = SecretBox.from_b64(settings.secret_key, settings.secret_keys_retired)
        checker = TokenChecker(sessions, redis, box, gateway, clock)
        return cls(settings, redis, sessions, calendar, clock, stopping, checker), gateway

    async def _pause(self, seconds: float) -> None:
        await sleep_unless_stopped(self.stopping, seconds)

    async def preopen_checks_forever(self) -> None:
        """At preopen_check_time on every trading day, check the tokens of accounts with running strategies."""
        if self.checker is None:
            return
        while not self.stopping.is_set():
            due = self.calendar.next_trading_day_at(self.settings.preopen_check_time, self.clock.now())
            # Short sleeps: the clock may be a test's (or the demo's) and jump ahead.
            while not self.stopping.is_set() and self.clock.now() < due:
                await self._pause(min(1.0, max(0.01, (due - self.clock.now()).total_seconds())))
            if self.stopping.is_set():
                return
            day = self.calendar.trading_day_of(due)
            try:
                await self.preopen_check(day)
            except (SQLAlchemyError, RedisError, OSError) as exc:
                log.warning("pre-open token check failed; strategy starts still check", error=str(exc),
                            trading_day=day.isoformat())

    async def preopen_check(self, day: date) -> dict[str, int]:
        """Check every account with running strategies once for `day` (across replicas); return counts."""
        assert self.checker is not None
        async with self.sessions() as session:
            users = (await session.execute(
                select(Strategy.user_id, func.count()).where(Strategy.status == StrategyStatus.running)
                .group_by(Strategy.user_id))).all()
        counts = {"accounts": len(users), "checked": 0, "expired": 0}
        limit = asyncio.Semaphore(CHECK_CONCURRENCY)

        async def check_one(user_id: Any, running: int) -> None:
            async with limit:
                await self._check_account(user_id, running, day, counts)

        await asyncio.gather(*(check_one(user_id, running) for user_id, running in users))
        log.info("pre-open token check done", trading_day=day.isoformat(), **counts)
        return counts

    async def _check_account(self, user_id: Any, running: int, day: date, counts: dict[str, int]) -> None:
        assert self.checker is not None
        if not await self.redis.set(keys.token_check_key(user_id, day), "1", nx=True, ex=keys.RUN_MARKER_TTL_S):
            return  # another replica has it
        check = await self.checker.check(user_id)
        if check is not None:
            counts["checked"] += 1
            TOKEN_CHECKS.labels(state=check.state.value).inc()
            if check.state == TokenState.expired:
                counts["expired"] += 1
                # The notification: one line per account per day, and the status flag.
                log.warning("kite login needed before buy time", user_id=str(user_id), running=running,
                            trading_day=day.isoformat())

    async def rearm_forever(self) -> None:
        """Arm ended runs of repeating strategies for their next trading day; watch the halt key."""
        pause = self.settings.rearm_interval_s
        # An outage backs off (from twice the interval, up to 30 s) instead of logging every pass.
        outage = Backoff(base=2 * self.settings.rearm_interval_s, cap=30.0)
        while not self.stopping.is_set():
            try:
                await self.watch_halt()
                armed = await rearm_ended_runs(self.sessions, self.redis, self.calendar, self.clock.now())
                REARMED.inc(len(armed))
                pause = self.settings.rearm_interval_s
                outage.reset()
            except (SQLAlchemyError, RedisError, OSError) as exc:
                pause = outage.next()
                log.warning("re-arm pass failed; retrying", error=str(exc), retry_in_s=pause)
            await self._pause(pause)

    async def watch_halt(self) -> None:
        halted = bool(await self.redis.exists(keys.OPERATOR_HALT))
        HALT.set(1 if halted else 0)
        if halted != self._halted and (halted or self._halted is not None):
            if halted:
                log.warning("operator halt set: executors place no new entries", key=keys.OPERATOR_HALT)
            else:
                log.warning("operator halt cleared", key=keys.OPERATOR_HALT)
        self._halted = halted
