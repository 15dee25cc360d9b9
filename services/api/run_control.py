"""Start and stop strategy runs: Postgres status plus the Redis runtime layer, never half of it.

Start: in one Postgres transaction the row becomes `running` with a fresh
`started_at` (the run id); before that transaction commits, `load_run` loads
Redis in one Lua script; if the commit then fails, the load is undone. If the
load fails, the transaction rolls back. Starting a running strategy is a no-op.

Stop: under the strategy's `lock_state` (so no executor is mid-order), the row
becomes `stopped` and `unload_run` removes the run from Redis. With
`square_off: true` while `bought`, one script instead removes the schedule and
the listener watch but keeps `strategy:{id}`/`runtime:{id}` and enqueues a SELL
(`metadata.square_off`) for the executor, which unloads the rest after the
exit fills. If the Postgres commit fails after an unload, the run is loaded
back with the runtime state it had.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime
from uuid import UUID

import structlog
from aiohttp import web
from redis.asyncio import Redis

from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.models import (
    ControlMessage,
    RuntimeState,
    SellEvent,
    StartStrategyRequest,
    StopStrategyRequest,
    StrategyConfig,
    event_to_json,
)
from libs.schema.models import StrategyStatus as S
from libs.schema.tables import BrokerCredential, Strategy
from libs.trading.repeat import end_series
from libs.trading.runs import (
    CONTROL_MAXLEN,
    RunPlan,
    commit_loaded_run,
    commit_or_undo,
    config_for,
    load_run,
    loaded_config,
    plan_run,
    unload_run,
)
from services.api.broker import load_credentials, require_valid, write_broker_hash
from services.api.deps import CALENDAR, REDIS, SESSIONS, SETTINGS, current_user, read_model
from services.api.errors import ApiError, json_response
from services.api.instruments import instrument_token
from services.api.kite_login import require_live_token
from services.api.status import build_status
from services.api.strategies import check_times, own_strategy

log = structlog.get_logger("api")

LOCK_PX_MS = 10_000

# Square-off: unschedule and unwatch, keep strategy/runtime, enqueue the exit; or,
# if the position is not `bought` (any more), unload fully like unload_run.
_SQUARE_OFF = """
local pos = redis.call('HGET', KEYS[2], 'position')
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[2], ARGV[3])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
if pos == 'bought' then
  redis.call('XADD', KEYS[6], '*', 'event', ARGV[6])
  return 1
end
redis.call('DEL', KEYS[1], KEYS[2])
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def start(request: web.Request) -> web.Response:
    """Start a strategy run; a running strategy answers its status unchanged."""
    app = request.app
    user_id = current_user(request)
    body = await read_model(request, StartStrategyRequest)
    async with app[SESSIONS]() as session:
        row = await own_strategy(session, user_id, body.strategy_id)
        if row.status == S.running:
            return json_response(await build_status(app, row))
        creds = require_valid(await load_credentials(app, session, user_id))
    await require_live_token(app, user_id)
    check_times(app, row.buy_time, row.sell_time)
    token = await instrument_token(app, user_id, row.symbol)
    redis = app[REDIS]
    if await redis.exists(keys.strategy_key(row.id)):
        raise ApiError(409, "strategy_exiting", "a square-off of the previous run is still in progress; "
                                                "start again once it has exited")
    async with app[SESSIONS]() as session:
        row = await own_strategy(session, user_id, body.strategy_id, for_update=True)
        if row.status == S.running:  # a concurrent start won
            return json_response(await build_status(app, row))
        now = datetime.now(UTC)
        row.status, row.started_at, row.stopped_at, row.failure_reason = S.running, now, None, None
        await session.flush()
        config = config_for(row, api_key_fp=creds.api_key_fp, instrument_token=token)
        plan = plan_run(config, app[CALENDAR], now)
        broker_row = await session.get(BrokerCredential, user_id)

        async def mirror_credentials() -> None:
            if broker_row is not None:
                await write_broker_hash(redis, broker_row)

        await commit_loaded_run(session, redis, config, plan, now=now, before_load=mirror_credentials)
        await session.refresh(row)
    log.info("strategy started", strategy_id=str(row.id), run_id=config.run_id,
             trading_day=plan.trading_day.isoformat(), buy_due_ms=plan.buy_due_ms)
    return json_response(await build_status(app, row))


async def stop(request: web.Request) -> web.Response:
    """Stop a strategy run; optionally square off an open position."""
    app = request.app
    user_id = current_user(request)
    body = await read_model(request, StopStrategyRequest)
    async with app[SESSIONS]() as session:
        row = await own_strategy(session, user_id, body.strategy_id)
        if row.status != S.running and await end_series(session, user_id, row.id):
            await session.refresh(row)  # a repeating strategy between runs: no next run
    if row.status != S.running:
        return json_response(await build_status(app, row))
    row, _ = await stop_run(app, user_id, body.strategy_id, body.square_off, app[SETTINGS].stop_lock_wait_s)
    return json_response(await build_status(app, row))


async def stop_run(app: web.Application, user_id: UUID, strategy_id: UUID, square_off: bool,
                   lock_wait_s: float) -> tuple[Strategy, bool]:
    """Stop one run under its executor lock; return the row and whether a square-off SELL was queued.

    409 `strategy_busy` if an order stays in flight longer than lock_wait_s.
    """
    redis = app[REDIS]
    owner = await _acquire_lock(redis, strategy_id, lock_wait_s)
    try:
        return await _stop_locked(app, user_id, strategy_id, square_off)
    finally:
        await redis.eval(_RELEASE, 1, keys.lock_key(strategy_id), owner)


async def _stop_locked(app: web.Application, user_id: UUID, strategy_id: UUID,
                       square_off: bool) -> tuple[Strategy, bool]:
    redis = app[REDIS]
    async with app[SESSIONS]() as session:
        row = await own_strategy(session, user_id, strategy_id, for_update=True)
        if row.status != S.running or row.started_at is None:
            return row, False
        rebuilt = config_for(row)
        config = await loaded_config(redis, str(row.id))
        if config is None or config.run_id != rebuilt.run_id:
            config = rebuilt  # Redis lost the run: unloading still clears the schedule members
        plan = plan_run(config, app[CALENDAR], row.started_at)
        now = datetime.now(UTC)
        row.status, row.stopped_at = S.stopped, now
        await session.flush()
        saved = await redis.hgetall(keys.runtime_key(row.id))
        squared = False
        try:
            if square_off:
                squared = await _square_off(redis, config, plan, now)
            else:
                await unload_run(redis, config, plan)
        except BaseException:
            await session.rollback()
            raise
        async def reload() -> None:
            if saved and not squared:
                await load_run(redis, config, plan, runtime=RuntimeState.from_redis_hash(saved))

        await commit_or_undo(session, reload, "stop", row.id)
        await session.refresh(row)
    log.info("strategy stopped", strategy_id=str(row.id), run_id=config.run_id, square_off=squared)
    return row, squared


async def _square_off(redis: Redis, config: StrategyConfig, plan: RunPlan, now: datetime) -> bool:
    """Unschedule and unwatch the run and enqueue its exit; return False if not bought (fully unloaded)."""
    sid = str(config.strategy_id)
    stopped = ControlMessage(action="stopped", strategy_id=config.strategy_id, symbol=config.symbol,
                             run_id=config.run_id)
    sell = SellEvent(strategy_id=config.strategy_id, run_id=config.run_id, trading_day=plan.trading_day,
                     trigger_time=now, metadata={"square_off": True})
    part = keys.partition_of(sid)  # every key below is in the strategy's partition: one hash slot
    result = await redis.eval(
        _SQUARE_OFF, 6,
        keys.strategy_key(sid), keys.runtime_key(sid), keys.symbol_strategies_key(config.symbol, part),
        keys.schedule_key(part), keys.control_stream(part), keys.orders_stream(part),
        sid, event_to_json(plan.buy), event_to_json(plan.sell), dumps(stopped), CONTROL_MAXLEN,
        event_to_json(sell),
    )
    return bool(result)


async def _acquire_lock(redis: Redis, strategy_id: UUID, wait_s: float) -> str:
    """Take the strategy's executor lock, waiting out an order in flight; 409 if it stays busy."""
    owner = "api-stop:" + secrets.token_hex(8)
    deadline = time.monotonic() + wait_s
    while True:
        if await redis.set(keys.lock_key(strategy_id), owner, nx=True, px=LOCK_PX_MS):
            return owner
        if time.monotonic() >= deadline:
            raise ApiError(409, "strategy_busy", "an order of this strategy is in flight; retry in a moment")
        await asyncio.sleep(0.05)
