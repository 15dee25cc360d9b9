"""The market listener's state and loops: control stream, ticks, triggers, prices, watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from datetime import UTC, date, datetime
from typing import Any

import structlog
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.broker.kite import BrokerError, KiteGateway
from libs.schema import keys
from libs.schema.models import ControlMessage, Position, StrategyConfig
from libs.trading.calendar import IST, SESSION_CLOSE, SESSION_OPEN, MarketCalendar
from libs.trading.runs import plan_run
from services.market_listener.feed import TOKEN_EXPIRED, TickerFeed
from services.market_listener.index import StopLossIndex, Watch
from services.market_listener.settings import ListenerSettings
from services.market_listener.trigger import StoplossEmitter

# A lazy proxy: configure_logging() runs in main(), after this module is imported, and a
# bound logger made now would keep structlog's default (console) configuration.
log = structlog.get_logger("market_listener")

TICKS = Counter("listener_ticks_total", "Ticks received from the feed.")
TICKS_PER_S = Gauge("listener_ticks_per_second", "Ticks received during the last second.")
TICK_TO_TRIGGER = Histogram(
    "listener_tick_to_trigger_seconds", "From a crossing tick reaching the listener to its STOPLOSS XADD.",
    buckets=(0.0001, 0.0002, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02,
             0.05, 0.1, 0.5))
FIRED = Counter("listener_stoploss_fired_total", "STOPLOSS events emitted.")
ALREADY_FIRED = Counter("listener_stoploss_already_fired_total", "Triggers whose run already had a STOPLOSS.")
RECONNECTS = Counter("listener_feed_reconnects_total", "Watchdog reconnects of the ticker.")
WATCHED = Gauge("listener_watched_strategies", "Bought strategies in the stop-loss index.")
INSTRUMENTS_TTL_S = 2 * 24 * 3600


class FeedLost(RuntimeError):
    """The feed could not be restored: the process exits non-zero for its supervisor."""


class MarketListener:
    """Follow running strategies, watch bought ones against live prices, emit STOPLOSS once."""

    def __init__(self, settings: ListenerSettings, redis: Redis, gateway: KiteGateway,
                 calendar: MarketCalendar) -> None:
        self.settings = settings
        self.redis = redis
        self.gateway = gateway
        self.calendar = calendar
        self.emitter = StoplossEmitter(redis, settings.stoploss_marker_ttl_s)
        self.index = StopLossIndex()
        self.runs: dict[str, tuple[str, str, date | None]] = {}  # id -> (symbol, run_id, trading_day)
        self.members: dict[str, set[str]] = {}  # symbol -> running strategy ids
        self.token_of: dict[str, int] = {}
        self.symbol_of: dict[int, str] = {}
        self.latest: dict[str, float] = {}
        self.dirty: dict[str, float] = {}
        self.feed = TickerFeed(settings.market_data_api_key, settings.market_data_access_token,
                               settings.kite_ws_root, self.ticks_from_thread)
        self.stopping = asyncio.Event()
        self.fired_total = 0
        self.last_tick = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._pending: deque[tuple[float, list[dict[str, Any]]]] = deque()
        self._drain_scheduled = False
        self._triggers: deque[tuple[Watch, float, float]] = deque()
        self._trigger_ready = asyncio.Event()
        self._ticks_seen = 0

    # --- ticks: ticker thread -> loop ---------------------------------------------------------------

    def ticks_from_thread(self, ticks: list[dict[str, Any]]) -> None:
        """Queue a batch of ticks from the ticker thread; never blocks."""
        self._pending.append((time.perf_counter(), ticks))
        self.last_tick = time.monotonic()
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon_threadsafe(self._drain_ticks)

    def _drain_ticks(self) -> None:
        # Reset the flag before draining: a batch queued meanwhile is drained now or schedules anew.
        self._drain_scheduled = False
        pending, symbol_of, latest, dirty = self._pending, self.symbol_of, self.latest, self.dirty
        by_symbol, fired_any, count = self.index.by_symbol, False, 0
        while pending:
            received, ticks = pending.popleft()
            count += len(ticks)
            for tick in ticks:
                symbol = symbol_of.get(tick["instrument_token"])
                if symbol is None:
                    continue
                price = tick["last_price"]
                latest[symbol] = dirty[symbol] = price
                entries = by_symbol.get(symbol)
                if entries is not None and entries[-1].stop_loss >= price:
                    for watch in self.index.pop_triggered(symbol, price):
                        self._triggers.append((watch, price, received))
                        fired_any = True
        self._ticks_seen += count
        if fired_any:
            self._trigger_ready.set()

    async def emit_triggers_forever(self) -> None:
        """Send triggered watches to Redis, as many per round trip as are waiting."""
        while True:
            await self._trigger_ready.wait()
            self._trigger_ready.clear()
            batch = list(self._triggers)
            self._triggers.clear()
            if batch and not await self._emit(batch):
                # Retry on the last price too, not only on the next crossing tick: the price
                # may sit below the stop without ticking (an illiquid symbol, a quiet feed).
                await self._pause(self.settings.trigger_retry_s)
                for symbol in {watch.symbol for watch, _, _ in batch}:
                    self._fire_at_last_price(symbol)
            if self.stopping.is_set():
                return  # after emitting what had already triggered

    async def _emit(self, batch: list[tuple[Watch, float, float]]) -> bool:
        try:
            results = await self.emitter.fire([(watch, price) for watch, price, _ in batch])
        except (RedisError, OSError) as exc:
            # Put them back: they fire again (the marker keeps it to one event) on the next
            # crossing tick or, after trigger_retry_s, at the last price.
            for watch, _, _ in batch:
                self.index.add(watch)
            log.error("stoploss not emitted; will retry", error=str(exc), count=len(batch))
            return False
        done = time.perf_counter()
        for (watch, price, received), msg_id in zip(batch, results, strict=True):
            if msg_id is None:
                ALREADY_FIRED.inc()
                continue
            TICK_TO_TRIGGER.observe(done - received)
            FIRED.inc()
            self.fired_total += 1
            log.info("stoploss fired", strategy_id=watch.strategy_id, event_type="STOPLOSS", price=price,
                     stop_loss=watch.stop_loss, msg_id=msg_id.decode() if isinstance(msg_id, bytes) else msg_id)
        WATCHED.set(len(self.index))
        return True

    # --- prices ---------------------------------------------------------------------------------------

    async def write_prices_forever(self) -> None:
        """Write the latest price of each symbol that ticked, at most once per interval, pipelined."""
        while not self.stopping.is_set():
            await self._pause(self.settings.price_write_interval_s)
            if not self.dirty:
                continue
            dirty, self.dirty = self.dirty, {}
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for symbol, price in dirty.items():
                        pipe.set(keys.price_key(symbol), repr(price))
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("prices not written", error=str(exc), symbols=len(dirty))
                for symbol, price in dirty.items():
                    self.dirty.setdefault(symbol, price)

    # --- control stream -------------------------------------------------------------------------------

    async def follow_control_forever(self) -> None:
        """Load the current state, then apply control messages from where the snapshot began.

        One follower per partition's control stream (a cluster cannot XREAD streams of
        several slots at once); a strategy's messages are all in its partition's stream,
        so each strategy's messages still apply in order.
        """
        last_ids = await self._load_state()
        async with asyncio.TaskGroup() as followers:
            for stream, last_id in last_ids.items():
                followers.create_task(self._follow_control(stream, last_id), name=f"control-{stream}")

    async def _follow_control(self, stream: str, last_id: bytes | str) -> None:
        while not self.stopping.is_set():
            try:
                reply = await self.redis.xread({stream: last_id}, count=500, block=self.settings.control_block_ms)
            except (RedisError, OSError) as exc:
                log.warning("control stream unavailable; retrying", error=str(exc))
                await self._pause(0.5)
                continue
            try:
                for _stream, entries in reply or ():
                    for msg_id, fields in entries:
                        await self._apply_control(fields.get(b"event"), msg_id)
                        last_id = msg_id  # only once applied: a failed one is read again
            except (RedisError, OSError) as exc:
                log.warning("control message not applied; retrying", error=str(exc))
                await self._pause(0.5)
            self._publish_tokens()

    async def _load_state(self) -> dict[str, bytes | str]:
        delay = 0.2
        while True:
            try:
                last_ids: dict[str, bytes | str] = {}
                for partition in range(keys.partition_count()):
                    stream = keys.control_stream(partition)
                    newest = await self.redis.xrevrange(stream, count=1)
                    last_ids[stream] = newest[0][0] if newest else "0-0"
                await self._scan_running()
                return last_ids
            except (RedisError, OSError) as exc:
                log.warning("state not loaded; retrying", error=str(exc))
                await self._pause(delay)
                delay = min(delay * 2, 5.0)

    async def _scan_running(self) -> None:
        ids: list[str] = []
        async for key in self.redis.scan_iter(match=keys.symbol_strategies_pattern(), count=1000):
            ids.extend(m.decode() for m in await self.redis.smembers(key))
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in chunk:
                    pipe.get(keys.strategy_key(sid))
                    pipe.hget(keys.runtime_key(sid), "position")
                replies = await pipe.execute()
            for i, sid in enumerate(chunk):
                raw, position = replies[2 * i], replies[2 * i + 1]
                if raw is None:
                    continue
                try:
                    config = StrategyConfig.model_validate_json(raw)
                except ValidationError:
                    log.error("unreadable strategy config skipped", strategy_id=sid)
                    continue
                self._track(sid, config.symbol, config.run_id, self._trading_day(config), config.instrument_token)
                if position == Position.bought.value.encode():
                    self._watch(sid, config.stop_loss)
        await self._resolve_tokens()
        self._publish_tokens()
        log.info("state loaded", running=len(self.runs), watched=len(self.index), symbols=len(self.members))

    async def _apply_control(self, raw: bytes | None, msg_id: bytes) -> None:
        try:
            msg = ControlMessage.model_validate_json(raw or b"")
        except ValidationError:
            log.error("malformed control message skipped", msg_id=msg_id.decode())
            return
        sid = str(msg.strategy_id)
        if msg.action == "started":
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(keys.strategy_key(sid))
                pipe.hget(keys.runtime_key(sid), "position")
                raw, position = await pipe.execute()
            config = StrategyConfig.model_validate_json(raw) if raw else None
            current = config is not None and config.run_id == msg.run_id
            day = self._trading_day(config) if current else None
            self._track(sid, msg.symbol, msg.run_id or "", day, config.instrument_token if config else None)
            await self._resolve_tokens()
            if current and position == Position.bought.value.encode():
                # A run loaded back already bought (a rebuild after Redis lost it keeps the
                # runtime the executor reconciled from the broker): no `position` message follows.
                self._watch(sid, config.stop_loss)
        elif msg.action == "stopped":
            self._untrack(sid)
        elif msg.position == Position.bought:
            known, stop_loss = self.runs.get(sid), msg.stop_loss
            if known is None or stop_loss is None or (msg.run_id and known[1] != msg.run_id):
                config = await self._config(sid)
                if config is None or (msg.run_id and config.run_id != msg.run_id):
                    return  # a stale message of a run no longer loaded
                stop_loss = stop_loss if stop_loss is not None else config.stop_loss
                self._track(sid, config.symbol, config.run_id, self._trading_day(config), config.instrument_token)
                await self._resolve_tokens()
            self._watch(sid, stop_loss)
        else:
            self.index.remove(sid)
        WATCHED.set(len(self.index))

    async def _config(self, sid: str) -> StrategyConfig | None:
        raw = await self.redis.get(keys.strategy_key(sid))
        return StrategyConfig.model_validate_json(raw) if raw else None

    def _trading_day(self, config: StrategyConfig) -> date | None:
        # The exit tag is derived from the run's trading day, so STOPLOSS must carry the plan's
        # day (not today's date), or it would not share the SELL's tag at the broker.
        try:
            return plan_run(config, self.calendar, datetime.fromisoformat(config.run_id)).trading_day
        except ValueError:
            return None

    def _track(self, sid: str, symbol: str, run_id: str, day: date | None, token: int | None) -> None:
        old = self.runs.get(sid)
        if old is not None and old[0] != symbol:
            self._untrack(sid)
        self.runs[sid] = (symbol, run_id, day)
        self.members.setdefault(symbol, set()).add(sid)
        if token is not None and symbol not in self.token_of:
            self.token_of[symbol] = token
            self.symbol_of[token] = symbol

    def _untrack(self, sid: str) -> None:
        self.index.remove(sid)
        known = self.runs.pop(sid, None)
        if known is not None:
            ids = self.members.get(known[0])
            if ids is not None:
                ids.discard(sid)
                if not ids:
                    del self.members[known[0]]

    def _watch(self, sid: str, stop_loss: float) -> None:
        symbol, run_id, day = self.runs[sid]
        day = day or self.calendar.trading_day_of(datetime.now(UTC))
        self.index.add(Watch(float(stop_loss), sid, run_id, day, symbol))
        # Already through the stop when the watch begins (the entry filled below it, or
        # the price fell while the fill was confirmed): the next tick may be long coming.
        self._fire_at_last_price(symbol)

    def _fire_at_last_price(self, symbol: str) -> None:
        """Trigger the watches of `symbol` that its last seen price has already crossed."""
        last = self.latest.get(symbol)
        if last is None:
            return
        fired = self.index.pop_triggered(symbol, last)
        for watch in fired:
            self._triggers.append((watch, last, time.perf_counter()))
        if fired:
            self._trigger_ready.set()

    # --- instruments and subscriptions ----------------------------------------------------------------

    async def _resolve_tokens(self) -> None:
        missing = [s for s in self.members if s not in self.token_of]
        if not missing:
            return
        cache_key = keys.instruments_key(self.settings.exchange, datetime.now(IST).date())
        cached = await self.redis.hmget(cache_key, missing)
        if any(token is None for token in cached):
            await self._refresh_instruments(cache_key)
            cached = await self.redis.hmget(cache_key, missing)
        for symbol, token in zip(missing, cached, strict=True):
            if token is None:
                log.error("unknown symbol: no instrument token, no stop-loss watching", symbol=symbol)
                continue
            self.token_of[symbol] = int(token)
            self.symbol_of[int(token)] = symbol

    async def _refresh_instruments(self, cache_key: str) -> None:
        try:
            rows = await self.gateway.instruments(self.settings.market_data_api_key,
                                                  self.settings.market_data_access_token, self.settings.exchange)
        except BrokerError as exc:
            log.error("instruments not fetched", error=exc.message, kind=exc.kind.value)
            return
        mapping = {str(r["tradingsymbol"]).upper(): int(r["instrument_token"]) for r in rows}
        if mapping:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(cache_key, mapping=mapping)
                pipe.expire(cache_key, INSTRUMENTS_TTL_S)
                await pipe.execute()
        log.info("instruments cached", count=len(mapping), key=cache_key)

    def _publish_tokens(self) -> None:
        wanted = frozenset(self.token_of[s] for s in self.members if s in self.token_of)
        if wanted != self.feed.wanted:
            self.feed.set_tokens(wanted)

    # --- watchdog -------------------------------------------------------------------------------------

    def market_open(self) -> bool:
        if self.calendar.always_open:
            return True
        now = datetime.now(IST)
        return self.calendar.is_trading_day(now.date()) and SESSION_OPEN <= now.time() <= SESSION_CLOSE

    async def watch_feed_forever(self) -> None:
        """Reconnect a silent feed; raise FeedLost after too many reconnects without a tick."""
        attempts, seen_at_last = 0, self._ticks_seen
        silence = self.settings.watchdog_silence_s
        while not self.stopping.is_set():
            await self._pause(1.0)
            seen = self._ticks_seen
            TICKS.inc(seen - seen_at_last)
            TICKS_PER_S.set(seen - seen_at_last)
            seen_at_last = seen
            now = time.monotonic()
            if self.feed.state == TOKEN_EXPIRED or not self.feed.wanted or not self.market_open():
                self.last_tick = now
                continue
            if now - self.last_tick < silence:
                attempts = 0
                continue
            attempts += 1
            if attempts > self.settings.watchdog_max_attempts:
                raise FeedLost(f"no tick for {attempts * silence:.0f}s after {attempts - 1} reconnects")
            RECONNECTS.inc()
            log.error("feed silent; reconnecting", silent_s=round(now - self.last_tick, 1), attempt=attempts)
            self.feed.reconnect()
            self.last_tick = now

    # --- lifecycle ------------------------------------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    def health(self) -> dict[str, object]:
        state = self.feed.state
        return {"ok": state != TOKEN_EXPIRED, "feed": state, "subscribed": len(self.feed.wanted),
                "watched": len(self.index)}

    def stop(self) -> None:
        self.stopping.set()
        self._trigger_ready.set()

    async def run(self) -> None:
        """Run every loop until stop(); FeedLost propagates."""
        with contextlib.suppress(RedisError, OSError):
            await self.emitter.load()  # warm the script cache; fire() loads it lazily otherwise
        self.feed.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.follow_control_forever(), name="control")
                tasks.create_task(self.emit_triggers_forever(), name="triggers")
                tasks.create_task(self.write_prices_forever(), name="prices")
                tasks.create_task(self.watch_feed_forever(), name="watchdog")
        finally:
            self.feed.close()
