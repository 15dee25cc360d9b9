"""Strategy status (data model §4.7) with the money of the latest run, and order log reads.

While a run is loaded, position and last action come from `runtime:{id}` and
the price from the listener's `price:{SYM}`; otherwise from the run's
confirmed fills in Postgres. Money always comes from confirmed fills
(`services.api.pnl`). Statuses of many strategies are read together: one
Redis pipeline and one Postgres query for all of them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog
from aiohttp import web
from pydantic import ValidationError
from sqlalchemy import select

from libs.schema import keys
from libs.schema.models import (
    LastAction,
    OrderLogOut,
    Position,
    RuntimeState,
    StatusResponse,
    StrategyConfig,
    StrategyStatus,
)
from libs.schema.tables import OrderLog, Strategy
from libs.trading.calendar import CalendarError
from libs.trading.runs import config_for, plan_run
from libs.trading.tokens import SESSION_EXPIRED_REASON
from services.api.deps import CALENDAR, READS, REDIS, current_user, path_uuid
from services.api.errors import field_error, json_response
from services.api.pnl import RunFills, latest_run_fills, money
from services.api.strategies import own_strategy, strategy_out

log = structlog.get_logger("api")

ORDERS_DEFAULT_LIMIT, ORDERS_MAX_LIMIT = 100, 1000


def _price(raw: bytes | None) -> float | None:
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and value == value and abs(value) != float("inf") else None


async def build_status(app: web.Application, row: Strategy) -> dict:
    """Return the §4.7 status of a strategy row."""
    async with app[READS]() as session:
        return (await build_statuses(app, session, [row]))[0]


async def build_statuses(app: web.Application, session: Any, rows: list[Strategy]) -> list[dict]:
    """Return the statuses of strategy rows, in order: one Redis pipeline, one Postgres query."""
    if not rows:
        return []
    async with app[REDIS].pipeline(transaction=False) as pipe:
        for row in rows:
            pipe.get(keys.strategy_key(row.id))
            pipe.hgetall(keys.runtime_key(row.id))
            pipe.get(keys.price_key(row.symbol))
            pipe.hmget(keys.broker_credentials_key(row.user_id), "token_state", "is_valid")
        replies = await pipe.execute()
    fills = await latest_run_fills(session, rows)
    return [_status(app, row, fills[row.id], *replies[4 * i:4 * i + 4]) for i, row in enumerate(rows)]


def _status(app: web.Application, row: Strategy, fills: RunFills, config_raw: bytes | None,
            runtime_raw: dict | None, price_raw: bytes | None, token: list[bytes | None]) -> dict:
    market = last_price = _price(price_raw)
    state, config = None, None
    if config_raw and runtime_raw:
        try:
            state = RuntimeState.from_redis_hash(runtime_raw)
            config = StrategyConfig.model_validate_json(config_raw)
        except ValidationError:
            log.warning("runtime state unreadable", strategy_id=str(row.id))
            state = None
    if state is not None and config is not None:
        if state.position == Position.bought and fills.entry_price is None and state.last_action == LastAction.BUY:
            # The BUY's row is not in Postgres yet; the executor wrote its fill price to runtime.
            fills.entered, fills.entry_price, fills.quantity = True, state.last_price, config.quantity
        position, last_action = state.position, state.last_action
        timestamp = state.updated_at or datetime.now(UTC)
        if last_price is None:
            last_price = state.last_price
    else:
        position = fills.position
        last_action = LastAction(fills.exit_kind.value) if fills.exit_kind else \
            LastAction.BUY if fills.entered else None
        timestamp = fills.last_at or row.updated_at
    out = StatusResponse(status=row.status, position=position, last_action=last_action, last_price=last_price,
                         timestamp=timestamp, **money(fills, market if position == Position.bought else None))
    token_state, is_valid = token
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


async def list_strategies(request: web.Request) -> web.Response:
    """List the caller's strategies, oldest first, each with its live status and money."""
    user_id = current_user(request)
    async with request.app[READS]() as session:
        _rows, items = await strategy_items(request.app, session, user_id)
    return json_response(items)


async def strategy_items(app: web.Application, session: Any, user_id: UUID) -> tuple[list[Strategy], list[dict]]:
    """Return the user's strategies, oldest first, and each one's list item (row, status and money)."""
    rows = list(await session.scalars(select(Strategy).where(Strategy.user_id == user_id,
                                                             Strategy.deleted_at.is_(None))
                                      .order_by(Strategy.created_at, Strategy.id)))
    statuses = await build_statuses(app, session, rows)
    return rows, [{**strategy_out(row), **live, "status": row.status.value}
                  for row, live in zip(rows, statuses, strict=True)]


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
        await own_strategy(session, user_id, strategy_id, include_deleted=True)  # the log outlives the strategy
        rows = await session.scalars(select(OrderLog).where(OrderLog.strategy_id == strategy_id)
                                     .order_by(OrderLog.created_at.desc(), OrderLog.id).limit(int(text)))
        return json_response([OrderLogOut.model_validate(r).model_dump(mode="json") for r in rows])
