"""Strategy status (data model §4.7) and order log reads.

While a run is loaded, status comes from `runtime:{id}` and the listener's
`price:{SYM}`; otherwise from Postgres: the strategy's status and its last
successful BUY/SELL/STOPLOSS order-log row of the latest run.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from aiohttp import web
from pydantic import ValidationError
from sqlalchemy import select

from libs.schema import keys
from libs.schema.models import (
    EventType,
    LastAction,
    OrderLogOut,
    OrderLogStatus,
    Position,
    RuntimeState,
    StatusResponse,
    StrategyStatus,
)
from libs.schema.tables import OrderLog, Strategy
from libs.trading.calendar import CalendarError
from libs.trading.runs import config_for, plan_run
from libs.trading.tokens import SESSION_EXPIRED_REASON
from services.api.deps import CALENDAR, READS, REDIS, current_user, path_uuid
from services.api.errors import field_error, json_response
from services.api.strategies import own_strategy

log = structlog.get_logger("api")

_POSITION_AFTER = {EventType.BUY: Position.bought, EventType.SELL: Position.sold,
                   EventType.STOPLOSS: Position.exited_by_sl}
ORDERS_DEFAULT_LIMIT, ORDERS_MAX_LIMIT = 100, 1000


def _price(raw: bytes | None) -> float | None:
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and value == value and abs(value) != float("inf") else None


async def build_status(app: web.Application, row: Strategy) -> dict:
    """Return the 4.7 status of a strategy row, with its trading day, next times and login flag."""
    redis = app[REDIS]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.strategy_key(row.id))
        pipe.hgetall(keys.runtime_key(row.id))
        pipe.get(keys.price_key(row.symbol))
        pipe.hmget(keys.broker_credentials_key(row.user_id), "token_state", "is_valid")
        config_raw, runtime_raw, price_raw, (token_state, is_valid) = await pipe.execute()
    last_price = _price(price_raw)
    if config_raw and runtime_raw:
        try:
            state = RuntimeState.from_redis_hash(runtime_raw)
        except ValidationError:
            log.warning("runtime state unreadable", strategy_id=str(row.id))
        else:
            out = StatusResponse(status=row.status, position=state.position, last_action=state.last_action,
                                 last_price=last_price if last_price is not None else state.last_price,
                                 timestamp=state.updated_at or datetime.now(UTC))
            return _with_day(app, row, out, token_state or (b"expired" if is_valid == b"0" else None))
    last = await _last_fill(app, row)
    out = StatusResponse(
        status=row.status,
        position=_POSITION_AFTER[last.event_type] if last else Position.none,
        last_action=LastAction(last.event_type.value) if last else None,
        last_price=last_price,
        timestamp=last.created_at if last else row.updated_at,
    )
    return _with_day(app, row, out, token_state or (b"expired" if is_valid == b"0" else None))


def _with_day(app: web.Application, row: Strategy, out: StatusResponse, token_state: bytes | None) -> dict:
    """Add the run's trading day, its next buy/sell, repeat, and whether it needs a Kite login."""
    out.repeat = row.repeat or "once"  # type: ignore[assignment]
    running = row.status == StrategyStatus.running
    if row.started_at is not None:
        try:
            plan = plan_run(config_for(row), app[CALENDAR], row.started_at)
        except (CalendarError, ValueError):
            plan = None
        if plan is not None:
            out.trading_day = plan.trading_day
            if running and out.position == Position.none:
                out.next_buy_at = plan.buy.trigger_time
            if running and out.position in (Position.none, Position.bought):
                out.next_sell_at = plan.sell.trigger_time
    if running and token_state == b"expired":
        out.needs_login, out.reason = True, SESSION_EXPIRED_REASON + " (GET /api/v1/broker/login) before buy time"
    elif row.status == StrategyStatus.failed:
        out.reason = row.failure_reason
    return out.model_dump(mode="json")


async def _last_fill(app: web.Application, row: Strategy) -> OrderLog | None:
    """Return the newest successful BUY/SELL/STOPLOSS row of the strategy's latest run."""
    if row.started_at is None:
        return None
    stmt = (select(OrderLog)
            .where(OrderLog.strategy_id == row.id, OrderLog.status == OrderLogStatus.success,
                   OrderLog.event_type.in_(list(_POSITION_AFTER)), OrderLog.created_at >= row.started_at)
            .order_by(OrderLog.created_at.desc()).limit(1))
    async with app[READS]() as session:
        return await session.scalar(stmt)


async def status(request: web.Request) -> web.Response:
    """Return the live status of one of the caller's strategies."""
    user_id = current_user(request)
    strategy_id = path_uuid(request)
    async with request.app[READS]() as session:
        row = await own_strategy(session, user_id, strategy_id)
    return json_response(await build_status(request.app, row))


async def orders(request: web.Request) -> web.Response:
    """Return the strategy's order-log rows, newest first (`?limit=`, default 100, at most 1000)."""
    user_id = current_user(request)
    strategy_id = path_uuid(request)
    text = request.query.get("limit", str(ORDERS_DEFAULT_LIMIT))
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not 1 <= int(text) <= ORDERS_MAX_LIMIT:
        raise field_error(["query", "limit"], f"limit must be an integer from 1 to {ORDERS_MAX_LIMIT}",
                          "limit_range")
    async with request.app[READS]() as session:
        await own_strategy(session, user_id, strategy_id)
        rows = await session.scalars(select(OrderLog).where(OrderLog.strategy_id == strategy_id)
                                     .order_by(OrderLog.created_at.desc(), OrderLog.id).limit(int(text)))
        return json_response([OrderLogOut.model_validate(r).model_dump(mode="json") for r in rows])
