"""The market listener: the run tracker, the tick pump and the watchdog around one feed, on one loop."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from libs.broker.kite import KiteGateway
from libs.service.lifecycle import sleep_unless_stopped
from libs.trading.calendar import MarketCalendar
from services.market_listener.feed import TOKEN_EXPIRED, TickerFeed
from services.market_listener.index import StopLossIndex
from services.market_listener.pump import TickPump
from services.market_listener.settings import ListenerSettings
from services.market_listener.tracker import RunTracker
from services.market_listener.trigger import StoplossEmitter
from services.market_listener.watchdog import FeedLost, FeedWatchdog

__all__ = ["FeedLost", "MarketListener"]


class MarketListener:
    """Follow running strategies, watch bought ones against live prices, emit STOPLOSS once."""

    def __init__(self, settings: ListenerSettings, redis: Redis, gateway: KiteGateway,
                 calendar: MarketCalendar) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.index = StopLossIndex()
        self.tracker = RunTracker(settings, redis, gateway, calendar, self.index,
                                  on_watch=self._on_watch, on_tokens=self._on_tokens,
                                  pause=self.pause, stopping=self.stopping)
        self.pump = TickPump(settings, redis, self.index, self.tracker.symbol_of,
                             StoplossEmitter(redis, settings.stoploss_marker_ttl_s), self.pause, self.stopping)
        self.feed = TickerFeed(settings.market_data_api_key, settings.market_data_access_token,
                               settings.kite_ws_root, self.pump.on_ticks)
        self.watchdog = FeedWatchdog(settings, self.feed, self.pump, calendar, self.pause, self.stopping)

    def _on_watch(self, symbol: str) -> None:
        self.pump.fire_at_last_price(symbol)

    def _on_tokens(self, tokens: frozenset[int]) -> None:
        self.feed.set_tokens(tokens)

    @property
    def fired_total(self) -> int:
        return self.pump.fired_total

    @property
    def members(self) -> dict[str, set[str]]:
        return self.tracker.members

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once on stop()."""
        await sleep_unless_stopped(self.stopping, seconds)

    def health(self) -> dict[str, object]:
        state = self.feed.state
        return {"ok": state != TOKEN_EXPIRED, "feed": state, "subscribed": len(self.feed.wanted),
                "watched": len(self.index)}

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        """Run every loop until stop(); FeedLost propagates. STOPLOSS events already triggered are sent first."""
        try:
            async with asyncio.TaskGroup() as tasks:
                feed = tasks.create_task(self.feed.run(), name="feed")
                tasks.create_task(self.tracker.follow_control_forever(), name="control")
                tasks.create_task(self.pump.write_prices_forever(), name="prices")
                tasks.create_task(self.watchdog.watch_forever(), name="watchdog")
                await self.stopping.wait()
                self.feed.close()
                feed.cancel()
        finally:
            self.feed.close()
            await self.pump.drain()
