"""The run tracker: which strategies run on which symbols, which are bought, and their instrument tokens.

It loads the running strategies at start and then follows the partitions'
`control:strategies` streams (see the package's `__main__` for why a stream and
not keyspace notifications). Bought runs go into the stop-loss index; the
symbols' instrument tokens are what the feed subscribes to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

import structlog
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.broker.kite import BrokerError, KiteGateway
from libs.schema import keys
from libs.schema.models import ControlMessage, Position, StrategyConfig
from libs.service.backoff import Backoff
from libs.trading.calendar import IST, MarketCalendar
from libs.trading.runs import plan_run
from services.market_listener.index import StopLossIndex, Watch
from services.market_listener.metrics import WATCHED
from services.market_listener.settings import ListenerSettings

log = structlog.get_logger("market_listener")

_BOUGHT = Position.bought.value.encode()


@dataclass(slots=True)
class TrackedRun:
    """One loaded run of a strategy, bought or not."""

    symbol: str
    run_id: str
    trading_day: date | None
    """The plan's trading day (the exit tag derives from it); None if the run could not be planned."""


class RunTracker:
    """Follow the running strategies; keep the stop-loss index and the wanted tokens true to Redis."""

    def __init__(self, settings: ListenerSettings, redis: Redis, gateway: KiteGateway, calendar: MarketCalendar,
                 index: StopLossIndex, on_watch: Callable[[str], None],
                 on_tokens: Callable[[frozenset[int]], None],
                 pause: Callable[[float], Awaitable[None]], stopping: asyncio.Event) -> None:
        self.settings = settings
        self.redis = redis
        self.gateway = gateway
        self.calendar = calendar
        self.index = index
        self.on_watch = on_watch  # a watch began on this symbol: fire it if its last price already crossed
        self.on_tokens = on_tokens  # the instrument tokens to subscribe changed
        self.pause = pause
        self.stopping = stopping
        self.runs: dict[str, TrackedRun] = {}
        self.members: dict[str, set[str]] = {}  # symbol -> running strategy ids
        self.token_of: dict[str, int] = {}
        self.symbol_of: dict[int, str] = {}
        self._published: frozenset[int] = frozenset()

    # --- the runs -------------------------------------------------------------------------------------

    def track(self, sid: str, symbol: str, run_id: str, day: date | None, token: int | None) -> None:
        """Note a loaded run (replacing an earlier run of the strategy)."""
        old = self.runs.get(sid)
        if old is not None and old.symbol != symbol:
            self.untrack(sid)
        self.runs[sid] = TrackedRun(symbol, run_id, day)
        self.members.setdefault(symbol, set()).add(sid)
        if token is not None and symbol not in self.token_of:
            self.token_of[symbol] = token
            self.symbol_of[token] = symbol

    def untrack(self, sid: str) -> None:
        """Forget a strategy's run and its watch."""
        self.index.remove(sid)
        known = self.runs.pop(sid, None)
        if known is not None:
            ids = self.members.get(known.symbol)
            if ids is not None:
                ids.discard(sid)
                if not ids:
                    del self.members[known.symbol]

    def watch(self, sid: str, stop_loss: float) -> None:
        """Watch a tracked, bought run for its stop-loss."""
        run = self.runs[sid]
        day = run.trading_day or self.calendar.trading_day_of(datetime.now(UTC))
        self.index.add(Watch(float(stop_loss), sid, run.run_id, day, run.symbol))
        # Already through the stop when the watch begins (the entry filled below it, or
        # the price fell while the fill was confirmed): the next tick may be long coming.
        self.on_watch(run.symbol)

    def _trading_day(self, config: StrategyConfig) -> date | None:
        # The exit tag is derived from the run's trading day, so STOPLOSS must carry the plan's
        # day (not today's date), or it would not share the SELL's tag at the broker.
        try:
            return plan_run(config, self.calendar, datetime.fromisoformat(config.run_id)).trading_day
        except ValueError:
            return None

    def _track_config(self, sid: str, config: StrategyConfig) -> None:
        self.track(sid, config.symbol, config.run_id, self._trading_day(config), config.instrument_token)

    # --- the control stream ---------------------------------------------------------------------------

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
                await self.pause(0.5)
                continue
            try:
                for _stream, entries in reply or ():
                    for msg_id, fields in entries:
                        await self.apply_control(fields.get(b"event"), msg_id)
                        last_id = msg_id  # only once applied: a failed one is read again
                WATCHED.set(len(self.index))
            except (RedisError, OSError) as exc:
                log.warning("control message not applied; retrying", error=str(exc))
                await self.pause(0.5)
            self.publish_tokens()

    async def _load_state(self) -> dict[str, bytes | str]:
        backoff = Backoff(base=0.2, cap=5.0)
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
                await self.pause(backoff.next())

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
                self._track_config(sid, config)
                if position == _BOUGHT:
                    self.watch(sid, config.stop_loss)
        await self._resolve_tokens()
        self.publish_tokens()
        log.info("state loaded", running=len(self.runs), watched=len(self.index), symbols=len(self.members))

    async def apply_control(self, raw: bytes | None, msg_id: bytes) -> None:
        """Apply one control message (each is idempotent: applying one twice is harmless)."""
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
            self.track(sid, msg.symbol, msg.run_id or "", day, config.instrument_token if config else None)
            await self._resolve_tokens()
            if current and position == _BOUGHT:
                # A run loaded back already bought (a rebuild after Redis lost it keeps the
                # runtime the executor reconciled from the broker): no `position` message follows.
                self.watch(sid, config.stop_loss)
        elif msg.action == "stopped":
            self.untrack(sid)
        elif msg.position == Position.bought:
            known, stop_loss = self.runs.get(sid), msg.stop_loss
            if known is None or stop_loss is None or (msg.run_id and known.run_id != msg.run_id):
                config = await self._config(sid)
                if config is None or (msg.run_id and config.run_id != msg.run_id):
                    return  # a stale message of a run no longer loaded
                stop_loss = stop_loss if stop_loss is not None else config.stop_loss
                self._track_config(sid, config)
                await self._resolve_tokens()
            self.watch(sid, stop_loss)
        else:
            self.index.remove(sid)

    async def _config(self, sid: str) -> StrategyConfig | None:
        raw = await self.redis.get(keys.strategy_key(sid))
        return StrategyConfig.model_validate_json(raw) if raw else None

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
                pipe.expire(cache_key, keys.INSTRUMENTS_TTL_S)
                await pipe.execute()
        log.info("instruments cached", count=len(mapping), key=cache_key)

    def publish_tokens(self) -> None:
        """Hand the feed the tokens of every tracked symbol, when they changed."""
        wanted = frozenset(self.token_of[s] for s in self.members if s in self.token_of)
        if wanted != self._published:
            self._published = wanted
            self.on_tokens(wanted)
