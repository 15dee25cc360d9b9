"""The tick pump: each frame from the feed updates the latest prices and fires crossed stop-losses at once.

Runs on the loop, called by the feed for every frame: one dict lookup per tick,
one comparison with the symbol's highest stop-loss, and a bisect only when
something crossed. A crossing starts its marker+XADD script in a task right
away (no batching interval); the crossings of one frame are fired together.
`price:{SYM}` is written by a separate loop, one MSET, at most every
price_write_interval_s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from libs.schema import keys
from services.market_listener import metrics
from services.market_listener.index import StopLossIndex, Watch
from services.market_listener.settings import ListenerSettings
from services.market_listener.trigger import StoplossEmitter

log = structlog.get_logger("market_listener")

Crossing = tuple[Watch, float]  # a watch and the price that crossed it


class TickPump:
    """Turn ticks into latest prices and STOPLOSS events."""

    def __init__(self, settings: ListenerSettings, redis: Redis, index: StopLossIndex, symbol_of: dict[int, str],
                 emitter: StoplossEmitter, pause: Callable[[float], Awaitable[None]],
                 stopping: asyncio.Event) -> None:
        self.settings = settings
        self.redis = redis
        self.index = index
        self.symbol_of = symbol_of  # the run tracker's token -> symbol map, read as it changes
        self.emitter = emitter
        self.pause = pause
        self.stopping = stopping
        self.latest: dict[str, float] = {}
        self.dirty: dict[str, float] = {}
        self.ticks_seen = 0
        self.last_tick = time.monotonic()
        self.fired_total = 0
        self._emitting: set[asyncio.Task[None]] = set()

    # --- ticks ----------------------------------------------------------------------------------------

    def on_ticks(self, ticks: list[dict[str, Any]]) -> None:
        """Take one frame of ticks (on the loop; never blocks)."""
        received = time.perf_counter()
        self.last_tick = time.monotonic()
        self.ticks_seen += len(ticks)
        symbol_of, latest, dirty, by_symbol = self.symbol_of, self.latest, self.dirty, self.index.by_symbol
        crossed: list[Crossing] | None = None
        for tick in ticks:
            symbol = symbol_of.get(tick["instrument_token"])
            if symbol is None:
                continue
            price = tick["last_price"]
            latest[symbol] = dirty[symbol] = price
            entries = by_symbol.get(symbol)
            if entries is not None and entries[-1].stop_loss >= price:
                if crossed is None:
                    crossed = []
                crossed.extend((watch, price) for watch in self.index.pop_triggered(symbol, price))
        if crossed:
            self._fire(crossed, received)

    def fire_at_last_price(self, symbol: str) -> None:
        """Fire the watches of `symbol` that its last seen price has already crossed."""
        last = self.latest.get(symbol)
        if last is None:
            return
        crossed = [(watch, last) for watch in self.index.pop_triggered(symbol, last)]
        if crossed:
            self._fire(crossed, time.perf_counter())

    def _fire(self, crossed: list[Crossing], received: float) -> None:
        # The event's trigger_time is when the crossing was seen, not when the script ran.
        task = asyncio.get_running_loop().create_task(self._emit(crossed, received, datetime.now(UTC)),
                                                      name="stoploss-fire")
        self._emitting.add(task)
        task.add_done_callback(self._emitting.discard)

    async def _emit(self, crossed: list[Crossing], received: float, seen_at: datetime) -> None:
        try:
            results = await self.emitter.fire(crossed, seen_at)
        except (RedisError, OSError) as exc:
            # Put them back: they fire again (the marker keeps it to one event) on the next
            # crossing tick or, after trigger_retry_s, at the last price: the price may sit
            # below the stop without ticking (an illiquid symbol, a quiet feed).
            for watch, _ in crossed:
                self.index.add(watch)
            log.error("stoploss not emitted; will retry", error=str(exc), count=len(crossed))
            await self.pause(self.settings.trigger_retry_s)
            if not self.stopping.is_set():
                for symbol in {watch.symbol for watch, _ in crossed}:
                    self.fire_at_last_price(symbol)
            return
        done = time.perf_counter()
        for (watch, price), msg_id in zip(crossed, results, strict=True):
            if msg_id is None:
                metrics.ALREADY_FIRED.inc()
                continue
            metrics.TICK_TO_TRIGGER.observe(done - received)
            metrics.FIRED.inc()
            self.fired_total += 1
            log.info("stoploss fired", strategy_id=watch.strategy_id, event_type="STOPLOSS", price=price,
                     stop_loss=watch.stop_loss, msg_id=msg_id.decode() if isinstance(msg_id, bytes) else msg_id)
        metrics.WATCHED.set(len(self.index))

    async def drain(self) -> None:
        """Wait for every STOPLOSS already on its way to Redis."""
        while self._emitting:
            await asyncio.wait(set(self._emitting))

    # --- prices ---------------------------------------------------------------------------------------

    async def write_prices_forever(self) -> None:
        """Write the latest price of each symbol that ticked, at most once per interval, in one MSET."""
        while not self.stopping.is_set():
            await self.pause(self.settings.price_write_interval_s)
            if not self.dirty:
                continue
            dirty, self.dirty = self.dirty, {}
            # One MSET (one per slot on a cluster), not a SET each: at 5k ticks/s the writes
            # were the listener's largest CPU cost, a command packed and parsed per symbol.
            prices = {keys.price_key(symbol): repr(price) for symbol, price in dirty.items()}
            try:
                if isinstance(self.redis, RedisCluster):
                    await self.redis.mset_nonatomic(prices)
                else:
                    await self.redis.mset(prices)
            except (RedisError, OSError) as exc:
                log.warning("prices not written", error=str(exc), symbols=len(dirty))
                for symbol, price in dirty.items():
                    self.dirty.setdefault(symbol, price)
