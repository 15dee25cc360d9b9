"""Load a started strategy into Redis, and unload it, each in one atomic step.

Start writes `strategy:{id}`, a fresh `runtime:{id}` (position none), the
symbol-set membership, the BUY and SELL entries in `schedule`, and a `started`
control message, in one Lua script: a crash midway leaves nothing half-loaded.
Unload (stop, exit, failure) removes the same keys and members and tells the
listeners. RETRY entries of an unloaded run may stay in `schedule`; the
executor skips events whose run is no longer loaded, so they are harmless.

Every key a script touches is in the strategy's partition (`keys.partition_of`):
its own keys, the partition's `schedule`, symbol set and control stream, so
each script runs in one hash slot of a Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from redis.asyncio import Redis

from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.models import (
    BuyEvent,
    ControlMessage,
    Event,
    Position,
    RuntimeState,
    SellEvent,
    StrategyConfig,
    event_to_json,
)
from libs.service.logging import get_logger
from libs.service.scripts import script_for
from libs.trading.calendar import MarketCalendar, epoch_ms
from libs.trading.lock import MIRROR_LOCK_FN

_log = get_logger("runs")

CONTROL_MAXLEN = keys.CONTROL_MAXLEN

_LOAD = """
-- KEYS: [1] strategy:{id} (string), [2] runtime:{id} (hash), [3] symbol:{symbol}:strategies (set),
--       [4] schedule (zset), [5] control:strategies (stream), [6] lock_state:{id} (string),
--       [7] entry:unsent:{id}:{run_id} (string; only when a start loads a new run)
-- ARGV: [1] config JSON, [2] runtime fields (JSON flat list), [3] strategy_id, [4] BUY member,
--       [5] BUY due ms, [6] SELL member, [7] SELL due ms, [8] `started` control JSON,
--       [9] control MAXLEN, [10] schedule wake-up channel, [11] KEYS[7]'s TTL s (with KEYS[7])
-- Returns: 1. The runtime is replaced, not merged: no field of an earlier run survives; its
--          lock_state follows KEYS[6] (a load may run while a holder has the lock).
""" + MIRROR_LOCK_FN + """
redis.call('SET', KEYS[1], ARGV[1])
if KEYS[7] then redis.call('SET', KEYS[7], '1', 'EX', ARGV[11]) end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(cjson.decode(ARGV[2])))
mirror_lock(KEYS[6], KEYS[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4], ARGV[7], ARGV[6])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[9], '*', 'event', ARGV[8])
redis.call('PUBLISH', ARGV[10], ARGV[5])
return 1
"""

_UNLOAD = """
-- KEYS: [1] strategy:{id} (string), [2] runtime:{id} (hash), [3] symbol:{symbol}:strategies (set),
--       [4] schedule (zset), [5] control:strategies (stream), [6] entry:unsent:{id}:{run_id} (string)
-- ARGV: [1] strategy_id, [2] BUY member, [3] SELL member, [4] `stopped` control JSON, [5] control MAXLEN
-- Returns: how many of KEYS[1], KEYS[2] existed (0: the run was not loaded). The `stopped`
--          message goes out either way (listeners drop what they may still watch).
local existed = redis.call('DEL', KEYS[1], KEYS[2])
redis.call('DEL', KEYS[6])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[2], ARGV[3])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
return existed
"""

_SCHEDULE = """
-- KEYS: [1] schedule (zset)
-- ARGV: [1] event member (canonical JSON), [2] due ms, [3] schedule wake-up channel
-- Returns: 1. Scheduling a member again only moves its due time.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class RunPlan:
    """The two scheduled events of one strategy run and when they are due."""

    trading_day: date
    buy: BuyEvent
    sell: SellEvent

    @property
    def buy_due_ms(self) -> int:
        assert self.buy.trigger_time is not None
        return epoch_ms(self.buy.trigger_time)

    @property
    def sell_due_ms(self) -> int:
        assert self.sell.trigger_time is not None
        return epoch_ms(self.sell.trigger_time)


def run_id_for(started_at: datetime) -> str:
    """Return the run id of a start: its UTC instant, ISO, microseconds kept."""
    return started_at.astimezone(UTC).isoformat(timespec="microseconds")


def plan_run(config: StrategyConfig, calendar: MarketCalendar, started_at: datetime) -> RunPlan:
    """Return the BUY and SELL of the run started at `started_at` (deterministic)."""
    day = calendar.next_run_day(config.buy_time, started_at, config.weekdays)
    common = {"strategy_id": config.strategy_id, "run_id": config.run_id, "trading_day": day}
    buy = BuyEvent(**common, trigger_time=calendar.at(day, config.buy_time))
    sell = SellEvent(**common, trigger_time=calendar.at(day, config.sell_time))
    return RunPlan(trading_day=day, buy=buy, sell=sell)


def started_message(config: StrategyConfig) -> ControlMessage:
    return ControlMessage(action="started", strategy_id=config.strategy_id, symbol=config.symbol,
                          stop_loss=config.stop_loss, run_id=config.run_id)


async def load_run(redis: Redis, config: StrategyConfig, plan: RunPlan, *, now: datetime | None = None,
                   runtime: RuntimeState | None = None, new_run: bool = False) -> None:
    """Atomically load a running strategy and schedule its BUY and SELL.

    `new_run`: a start that just made this run_id, so nothing of it can be at the
    broker: its first entry may skip the tag lookup (`keys.entry_unsent_key`). A
    reload of an existing run (a rebuild after Redis lost it) must never say so.
    """
    state = runtime or RuntimeState(position=Position.none, updated_at=now or datetime.now(UTC))
    flat: list[str] = [x for pair in state.to_redis_hash().items() for x in pair]
    sid = str(config.strategy_id)
    part = keys.partition_of(sid)
    script_keys = [keys.strategy_key(sid), keys.runtime_key(sid), keys.symbol_strategies_key(config.symbol, part),
                   keys.schedule_key(part), keys.control_stream(part), keys.lock_key(sid)]
    args: list[Any] = [dumps(config), dumps(flat), sid, event_to_json(plan.buy), plan.buy_due_ms,
                       event_to_json(plan.sell), plan.sell_due_ms, dumps(started_message(config)), CONTROL_MAXLEN,
                       keys.SCHEDULE_WAKEUP_CHANNEL]
    if new_run:
        script_keys.append(keys.entry_unsent_key(sid, config.run_id))
        args.append(keys.RUN_MARKER_TTL_S)
    await script_for(redis, _LOAD)(keys=script_keys, args=args)


async def commit_loaded_run(session: Any, redis: Redis, config: StrategyConfig, plan: RunPlan, *, now: datetime,
                            before_load: Callable[[], Awaitable[None]] | None = None) -> None:
    """Load a newly started run into Redis, then commit `session` (which marked it running); never half of it.

    If the load fails the transaction rolls back; if the commit fails the load is undone.
    """
    try:
        if before_load is not None:
            await before_load()
        await load_run(redis, config, plan, now=now, new_run=True)
    except BaseException:
        await session.rollback()
        raise
    await commit_or_undo(session, lambda: unload_run(redis, config, plan), "start", config.strategy_id)


async def commit_or_undo(session: Any, undo: Callable[[], Awaitable[Any]], action: str,
                         strategy_id: Any) -> None:
    """Commit `session`; if the commit fails, undo the Redis half (loudly if that fails too) and re-raise."""
    try:
        await session.commit()
    except BaseException:
        try:
            await undo()
        except Exception:  # noqa: BLE001 - the commit's own error is what the caller must see; this one is logged
            _log.exception("undo failed: Redis and Postgres disagree until the next rebuild", action=action,
                           strategy_id=str(strategy_id))
        raise


async def unload_run(redis: Redis, config: StrategyConfig, plan: RunPlan) -> bool:
    """Atomically unload a strategy run; return True if it was loaded."""
    sid = str(config.strategy_id)
    msg = ControlMessage(action="stopped", strategy_id=config.strategy_id, symbol=config.symbol,
                         run_id=config.run_id)
    part = keys.partition_of(sid)
    existed = await script_for(redis, _UNLOAD)(
        keys=[keys.strategy_key(sid), keys.runtime_key(sid), keys.symbol_strategies_key(config.symbol, part),
              keys.schedule_key(part), keys.control_stream(part), keys.entry_unsent_key(sid, config.run_id)],
        args=[sid, event_to_json(plan.buy), event_to_json(plan.sell), dumps(msg), CONTROL_MAXLEN])
    return bool(existed)


async def schedule_event(redis: Redis, event: Event, due_ms: int) -> None:
    """Add one event to its strategy's partition of `schedule` and wake sleeping schedulers."""
    await script_for(redis, _SCHEDULE)(keys=[keys.schedule_key(keys.partition_of(event.strategy_id))],
                                        args=[event_to_json(event), due_ms, keys.SCHEDULE_WAKEUP_CHANNEL])


async def loaded_config(redis: Redis, strategy_id: str) -> StrategyConfig | None:
    """Return the loaded config of a running strategy, or None."""
    raw = await redis.get(keys.strategy_key(strategy_id))
    return StrategyConfig.model_validate_json(raw) if raw else None


def config_for(strategy: Any, *, api_key_fp: str | None = None, instrument_token: int | None = None) -> StrategyConfig:
    """Return the `strategy:{id}` config of a started `tables.Strategy` row."""
    if strategy.started_at is None:
        raise ValueError("a strategy that never started has no run")
    return StrategyConfig(
        strategy_id=strategy.id, user_id=strategy.user_id, symbol=strategy.symbol,
        buy_time=strategy.buy_time, sell_time=strategy.sell_time, stop_loss=strategy.stop_loss,
        quantity=strategy.quantity, status="running", run_id=run_id_for(strategy.started_at),
        exchange=getattr(strategy, "exchange", None) or "NSE", product=getattr(strategy, "product", None) or "MIS",
        instrument_token=instrument_token, api_key_fp=api_key_fp,
        weekdays=tuple(strategy.weekdays) if getattr(strategy, "weekdays", None) else None,
    )
