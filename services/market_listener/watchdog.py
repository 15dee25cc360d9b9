"""The feed watchdog: reconnect a silent feed while the market is open; give up after too many tries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog

from libs.trading.calendar import IST, SESSION_CLOSE, SESSION_OPEN, MarketCalendar
from services.market_listener import metrics
from services.market_listener.feed import TOKEN_EXPIRED, TickerFeed
from services.market_listener.pump import TickPump
from services.market_listener.settings import ListenerSettings

log = structlog.get_logger("market_listener")


class FeedLost(RuntimeError):
    """The feed could not be restored: the process exits non-zero for its supervisor."""


class FeedWatchdog:
    """Count ticks each second; reconnect the feed when no tick came for watchdog_silence_s."""

    def __init__(self, settings: ListenerSettings, feed: TickerFeed, pump: TickPump, calendar: MarketCalendar,
                 pause: Callable[[float], Awaitable[None]], stopping: asyncio.Event) -> None:
        self.settings = settings
        self.feed = feed
        self.pump = pump
        self.calendar = calendar
        self.pause = pause
        self.stopping = stopping

    def market_open(self) -> bool:
        """Return True while ticks are expected (the session of a trading day, or always in tests)."""
        if self.calendar.always_open:
            return True
        now = datetime.now(IST)
        return self.calendar.is_trading_day(now.date()) and SESSION_OPEN <= now.time() <= SESSION_CLOSE

    async def watch_forever(self) -> None:
        """Reconnect a silent feed; raise FeedLost after too many reconnects without a tick."""
        attempts, seen_at_last = 0, self.pump.ticks_seen
        silence = self.settings.watchdog_silence_s
        while not self.stopping.is_set():
            await self.pause(1.0)
            seen = self.pump.ticks_seen
            metrics.TICKS.inc(seen - seen_at_last)
            metrics.TICKS_PER_S.set(seen - seen_at_last)
            seen_at_last = seen
            now = time.monotonic()
            if self.feed.state == TOKEN_EXPIRED or not self.feed.wanted or not self.market_open():
                self.pump.last_tick = now
                continue
            if now - self.pump.last_tick < silence:
                attempts = 0
                continue
            attempts += 1
            if attempts > self.settings.watchdog_max_attempts:
                raise FeedLost(f"no tick for {attempts * silence:.0f}s after {attempts - 1} reconnects")
            metrics.RECONNECTS.inc()
            log.error("feed silent; reconnecting", silent_s=round(now - self.pump.last_tick, 1), attempt=attempts)
            self.feed.reconnect()
            self.pump.last_tick = now
