"""Start and stop strategy runs: Postgres status plus the Redis runtime layer, never half of it.

Start: in one Postgres transaction the row becomes `running` with a fresh
`started_at` (the run id); before that transaction commits, `load_run` loads
Redis in one Lua script; if the commit then fails, the load is undone. If the
load fails, the transaction rolls back. Starting a running strategy is a no-op.

Stop: holding the strategy's lock (`libs.trading.lock`, the executor's: so no
order is in flight; renewed for as long as the stop takes), the row becomes
`stopped` and `unload_run` removes the run from Redis. A lock lost before the
Redis step (not renewed for a TTL, or taken over) changes nothing: 409. With
`square_off: true` while `bought`, one script instead removes the schedule and
the listener watch but keeps `strategy:{id}`/`runtime:{id}` and enqueues a SELL
(`metadata.square_off`) for the executor, which unloads the rest after the
exit fills. If the Postgres commit fails after an unload, the run is loaded
back with the runtime state it had.
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import structlog
from aiohttp import web
from redis.asyncio import Redis

from libs.broker.kite import TERMINAL, BrokerError, BrokerErrorKind, carries_tag, filled_quantity
from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.models import (
    ControlMessage,
    Position,
    RuntimeState,
    SellEvent,
    StartStrategyRequest,
    StopStrategyRequest,
    StrategyConfig,
    event_to_json,
)
from libs.schema.models import StrategyStatus as S
from libs.schema.tables import BrokerCredential, Strategy
from libs.service.scripts import script_for
from libs.trading.lock import MIRROR_LOCK_FN, Lease, LockLost, LockTimeout, StrategyLocks
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
from libs.trading.tags import order_tag
from services.api.broker import (
    broker_unavailable,
    load_credentials,
    mark_invalid,
    require_valid,
    write_broker_hash,
)
from services.api.deps import CALENDAR, GATEWAY, READS, REDIS, SESSIONS, SETTINGS, current_user, read_model
from services.api.errors import ApiError, json_response
from services.api.instruments import instrument_token
from services.api.kite_login import require_live_token
from services.api.status import build_status
from services.api.strategies import check_stop_loss, check_times, own_strategy

log = structlog.get_logger("api")

MARKER_TTL_S = keys.RUN_MARKER_TTL_S  # as the executor's exit marker: longer than any run; the run_id scopes it

# Square-off of a run that already ended (failed, stopped) with its position still open
# at the broker: load the run's config and a `bought` runtime (no schedule, no stop-loss
# watch), mark the exit as attempted (the executor looks the exit tag up before it
# places: never a second exit) and the square-off as requested, and enqueue the SELL.
# NX on strategy:{id}: two concurrent requests enqueue one exit.
_SQUARE_OFF_ENDED = """
-- KEYS: [1] strategy:{id} (string), [2] runtime:{id} (hash), [3] exit:attempted:{id}:{run_id} (string),
--       [4] squareoff:requested:{id}:{run_id} (string), [5] queue:orders (stream), [6] lock_state:{id} (string)
-- ARGV: [1] config JSON, [2] runtime fields as a JSON flat list, [3] SELL event JSON, [4] marker TTL s
-- Returns: 1 if loaded and the SELL queued, 0 if strategy:{id} exists (a run or square-off is loaded)
""" + MIRROR_LOCK_FN + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(cjson.decode(ARGV[2])))
mirror_lock(KEYS[6], KEYS[2])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[4])
redis.call('SET', KEYS[4], '1', 'EX', ARGV[4])
redis.call('XADD', KEYS[5], '*', 'event', ARGV[3])
return 1
"""

# Square-off: unschedule and unwatch, keep strategy/runtime, mark the square-off as
# requested (the executor refuses one without the marker) and enqueue the exit; or,
# if the position is not `bought` (any more), unload fully like unload_run.
_SQUARE_OFF = """
-- KEYS: [1] strategy:{id} (string), [2] runtime:{id} (hash), [3] symbol:{symbol}:strategies (set),
--       [4] schedule (zset), [5] control:strategies (stream), [6] queue:orders (stream),
--       [7] squareoff:requested:{id}:{run_id} (string)
-- ARGV: [1] strategy_id, [2] BUY event JSON, [3] SELL event JSON, [4] `stopped` control message JSON,
--       [5] control MAXLEN, [6] square-off SELL event JSON, [7] marker TTL s
-- Returns: 1 if bought and the SELL queued (run kept loaded), 0 if not bought (run fully unloaded)
local pos = redis.call('HGET', KEYS[2], 'position')
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[2], ARGV[3])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
if pos == 'bought' then
  redis.call('SET', KEYS[7], '1', 'EX', ARGV[7])
  redis.call('XADD', KEYS[6], '*', 'event', ARGV[6])
  return 1
end
redis.call('DEL', KEYS[1], KEYS[2])
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
            return await run_answer(app, row, False, "already running")
        creds = require_valid(await load_credentials(app, session, user_id))
    await require_live_token(app, user_id)
    check_times(app, row.buy_time, row.sell_time)
    token = await instrument_token(app, user_id, row.symbol)
    await check_stop_loss(app, creds, row.symbol, row.stop_loss, body.allow_stop_loss_above_price)
    redis = app[REDIS]
    async with app[SESSIONS]() as session:
        row = await own_strategy(session, user_id, body.strategy_id, for_update=True)
        if row.status == S.running:  # a concurrent start won (checked under the row lock, before Redis)
            return await run_answer(app, row, False, "already running")
        if await redis.exists(keys.strategy_key(row.id)):
            raise ApiError(409, "strategy_exiting", "a square-off of the previous run is still in progress; "
                                                    "start again once it has exited")
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
    return await run_answer(app, row, True, "started")


async def run_answer(app: web.Application, row: Strategy, changed: bool, reason: str) -> web.Response:
    """Answer start/stop: the status, whether this call changed anything, and what happened."""
    return json_response(await build_status(app, row) | {"changed": changed, "reason": reason})


_NOT_RUNNING = {S.created: "never started", S.stopped: "already stopped", S.exited: "already exited",
                S.failed: "the run failed earlier"}


async def stop(request: web.Request) -> web.Response:
    """Stop a strategy run; optionally square off an open position (also one an ended run left open)."""
    user_id = current_user(request)
    body = await read_model(request, StopStrategyRequest)
    row, changed, reason = await stop_strategy(request.app, user_id, body.strategy_id, body.square_off)
    return await run_answer(request.app, row, changed, reason)


async def stop_strategy(app: web.Application, user_id: UUID, strategy_id: UUID,
                        square_off: bool) -> tuple[Strategy, bool, str]:
    """Stop one of the user's strategies; return the row, whether anything changed, and what happened."""
    async with app[SESSIONS]() as session:
        row = await own_strategy(session, user_id, strategy_id)
        if row.status != S.running and await end_series(session, user_id, row.id):
            await session.refresh(row)  # a repeating strategy between runs: no next run
            if not square_off:
                return row, True, "stopped: the repeating strategy will not run again"
    if row.status != S.running:
        if square_off and row.started_at is not None:
            return await _square_off_ended_run(app, user_id, row)
        return row, False, f"not running: {_NOT_RUNNING.get(row.status, row.status.value)}"
    row, squared = await stop_run(app, user_id, strategy_id, square_off, app[SETTINGS].stop_lock_wait_s)
    if squared:
        return row, True, "stopped; square-off queued: the exit order is being placed"
    return row, True, "stopped" + ("; no open position to square off" if square_off else "")


async def stop_run(app: web.Application, user_id: UUID, strategy_id: UUID, square_off: bool,
                   lock_wait_s: float) -> tuple[Strategy, bool]:
    """Stop one run under its executor lock; return the row and whether a square-off SELL was queued.

    409 `strategy_busy` if an order stays in flight longer than lock_wait_s.
    """
    settings = app[SETTINGS]
    locks = StrategyLocks(app[REDIS], role="api", ttl_ms=settings.stop_lock_ttl_ms, wait_s=lock_wait_s)
    try:
        async with locks.hold(str(strategy_id)) as lease:
            return await _stop_locked(app, user_id, strategy_id, square_off, lease)
    except LockTimeout:
        raise ApiError(409, "strategy_busy", "an order of this strategy is in flight; retry in a moment") from None
    except LockLost:
        raise ApiError(409, "strategy_busy", "the strategy's lock was lost before the stop took effect; "
                       "nothing was changed: retry in a moment") from None


async def _stop_locked(app: web.Application, user_id: UUID, strategy_id: UUID, square_off: bool,
                       lease: Lease) -> tuple[Strategy, bool]:
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
            lease.ensure_held()  # last, right before Redis changes: a lock lost meanwhile changes nothing
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


async def _square_off_ended_run(app: web.Application, user_id: UUID, row: Strategy) -> tuple[Strategy, bool, str]:
    """Exit a position the ended run left open at the broker, exactly once; or say why not and what to do.

    The broker's order book decides: an entry filled under the run's entry tag and no
    filled exit under its exit tag means a position is held. The exit itself is placed
    by the executor (same tag, looked up first), never by the API.
    """
    redis = app[REDIS]
    if await redis.exists(keys.strategy_key(row.id)):
        return row, False, "a square-off of this run is already in progress"
    hold_hint = "or close the position in Kite yourself"
    async with app[SESSIONS]() as session:
        creds = await load_credentials(app, session, user_id)
    if creds is None:
        raise ApiError(409, "broker_not_connected", "connect your broker (POST /api/v1/broker/connect), then "
                       f"repeat the stop with square_off: true, {hold_hint}")
    if not creds.is_valid or not creds.access_token:
        raise ApiError(409, "broker_credentials_invalid",
                       "your broker credentials are not valid, so the position cannot be checked or exited: "
                       "refresh the session (POST /api/v1/broker/session), then repeat the stop with "
                       f"square_off: true, {hold_hint}")
    config = config_for(row, api_key_fp=creds.api_key_fp)
    plan = plan_run(config, app[CALENDAR], row.started_at)
    entry_tag, exit_tag = (order_tag(row.id, config.run_id, plan.trading_day, intent) for intent in ("entry", "exit"))
    try:
        book = await app[GATEWAY].orders(creds.api_key, creds.access_token)
    except BrokerError as exc:
        if exc.kind == BrokerErrorKind.AUTH:
            await mark_invalid(app, user_id)
            raise ApiError(409, "broker_credentials_invalid",
                           "the broker refused the stored token: refresh the session (POST "
                           f"/api/v1/broker/session), then repeat the stop with square_off: true, {hold_hint}") from None
        raise broker_unavailable(exc) from None
    entry, exit_ = _last_tagged(book, entry_tag), _last_tagged(book, exit_tag)
    details = {"entry_tag": entry_tag, "exit_tag": exit_tag}
    if entry is not None and entry.get("status") not in TERMINAL:
        raise ApiError(409, "entry_order_open", f"the run's entry order {entry.get('order_id')} is still open "
                       "at the broker: cancel it in Kite (and sell whatever filled)", details)
    if exit_ is not None and exit_.get("status") not in TERMINAL:
        raise ApiError(409, "exit_order_open", f"the run's exit order {exit_.get('order_id')} is still open at "
                       "the broker: wait for it, or check it in Kite", details)
    # Fills decide, not statuses: an entry cancelled after a partial fill still
    # left shares, and an exit cancelled after one still sold some.
    bought = sum(filled_quantity(o) for o in book if carries_tag(o, entry_tag))
    sold = sum(filled_quantity(o) for o in book if carries_tag(o, exit_tag))
    if bought == 0:
        return row, False, "no position to square off: the run's entry order never filled"
    if sold >= bought:
        return row, False, "no position to square off: the run's exit order already filled"
    broker_row = None
    async with app[READS]() as session:
        broker_row = await session.get(BrokerCredential, user_id)
    if broker_row is not None:
        await write_broker_hash(redis, broker_row)
    sid = str(row.id)
    queued = await _load_ended_square_off(redis, config, plan, entry.get("order_id"), datetime.now(UTC))
    if not queued:
        return row, False, "a square-off of this run is already in progress"
    log.warning("square-off of an ended run queued: its position is open at the broker", strategy_id=sid,
                run_id=config.run_id, status=row.status.value, exit_tag=exit_tag)
    return row, True, (f"square-off queued: the run ({row.status.value}) left its position open at the broker; "
                       "the exit order is being placed")


async def _load_ended_square_off(redis: Redis, config: StrategyConfig, plan: RunPlan, entry_order_id: str | None,
                                 now: datetime) -> bool:
    """Load an ended run as `bought` with its exit attempted and queue its square-off SELL; False if loaded."""
    runtime = RuntimeState(position=Position.bought, last_buy_order=entry_order_id, last_action="BUY", updated_at=now)
    flat = [x for pair in runtime.to_redis_hash().items() for x in pair]
    sell = SellEvent(strategy_id=config.strategy_id, run_id=config.run_id, trading_day=plan.trading_day,
                     trigger_time=now, metadata={"square_off": True})
    sid = str(config.strategy_id)
    return bool(await script_for(redis, _SQUARE_OFF_ENDED)(
        keys=[keys.strategy_key(sid), keys.runtime_key(sid), keys.exit_attempt_key(sid, config.run_id),
              keys.square_off_marker_key(sid, config.run_id),
              keys.orders_stream(keys.partition_of(sid)),  # every key in the strategy's partition: one hash slot
              keys.lock_key(sid)],
        args=[dumps(config), dumps(flat), event_to_json(sell), MARKER_TTL_S]))


def _last_tagged(book: list[dict], tag: str) -> dict | None:
    found = None
    for order in book:
        if carries_tag(order, tag):
            found = order
    return found


async def _square_off(redis: Redis, config: StrategyConfig, plan: RunPlan, now: datetime) -> bool:
    """Unschedule and unwatch the run and enqueue its exit; return False if not bought (fully unloaded)."""
    sid = str(config.strategy_id)
    stopped = ControlMessage(action="stopped", strategy_id=config.strategy_id, symbol=config.symbol,
                             run_id=config.run_id)
    sell = SellEvent(strategy_id=config.strategy_id, run_id=config.run_id, trading_day=plan.trading_day,
                     trigger_time=now, metadata={"square_off": True})
    part = keys.partition_of(sid)  # every key below is in the strategy's partition: one hash slot
    result = await script_for(redis, _SQUARE_OFF)(
        keys=[keys.strategy_key(sid), keys.runtime_key(sid), keys.symbol_strategies_key(config.symbol, part),
              keys.schedule_key(part), keys.control_stream(part), keys.orders_stream(part),
              keys.square_off_marker_key(sid, config.run_id)],
        args=[sid, event_to_json(plan.buy), event_to_json(plan.sell), dumps(stopped), CONTROL_MAXLEN,
              event_to_json(sell), MARKER_TTL_S],
    )
    return bool(result)
