"""Strategy CRUD: create (symbol checked against the broker), read, patch, delete (the list is in status).

A running strategy cannot be changed or deleted (409): its config is loaded
in Redis and the executors act on that copy. Delete is soft (`deleted_at`):
the strategy vanishes from every read except its order log, which is the
audit trail of money that moved and outlives it.
"""

from __future__ import annotations

import math
from datetime import time
from uuid import UUID

import structlog
from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.broker.kite import BrokerError
from libs.schema import keys
from libs.schema.models import (
    StrategyCreateRequest,
    StrategyOut,
    StrategyStatus,
    StrategyUpdateRequest,
    weekday_numbers,
)
from libs.schema.tables import Strategy
from libs.trading.calendar import CalendarError
from services.api.broker import Credentials, load_credentials, require_valid
from services.api.deps import CALENDAR, GATEWAY, READS, REDIS, SESSIONS, current_user, path_uuid, read_model
from services.api.errors import ApiError, field_error, json_response, not_found
from services.api.instruments import EXCHANGE, instrument_token

log = structlog.get_logger("api")


def strategy_out(row: Strategy) -> dict:
    return StrategyOut.model_validate(row).model_dump(mode="json")


async def own_strategy(session: AsyncSession, user_id: UUID, strategy_id: UUID, *,
                       for_update: bool = False, include_deleted: bool = False) -> Strategy:
    """Return the caller's strategy; another user's id is as unknown as a made-up one (404), a deleted one too."""
    stmt = select(Strategy).where(Strategy.id == strategy_id, Strategy.user_id == user_id)
    if not include_deleted:
        stmt = stmt.where(Strategy.deleted_at.is_(None))
    if for_update:
        stmt = stmt.with_for_update()
    row = await session.scalar(stmt.execution_options(populate_existing=True))
    if row is None:
        raise not_found("strategy")
    return row


def check_times(app: web.Application, buy_time: time, sell_time: time) -> None:
    """422 unless buy is before sell and both fit the trading session of the calendar."""
    if not buy_time < sell_time:
        raise field_error(["sell_time"], "buy_time must be before sell_time", "buy_before_sell")
    try:
        app[CALENDAR].validate_times(buy_time, sell_time)
    except CalendarError as exc:
        field = "buy_time" if str(exc).startswith("buy_time") else "sell_time"
        raise field_error([field], str(exc), "outside_session", code="outside_session") from None


async def last_price(app: web.Application, creds: Credentials, symbol: str) -> tuple[float, str] | None:
    """Return the last price of an NSE symbol and where it came from (the listener's, else the broker's).

    The listener's `price:{SYM}` is fresh only while it watches the symbol (some
    running strategy is on it); otherwise it is whatever it last saw, maybe days
    old, so the broker is asked instead.
    """
    redis = app[REDIS]
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(keys.partition_count()):
            pipe.scard(keys.symbol_strategies_key(symbol, partition))
        pipe.get(keys.price_key(symbol))
        *watchers, raw = await pipe.execute()
    if not any(watchers):
        raw = None
    try:
        price = float(raw) if raw is not None else None
    except ValueError:
        price = None
    if price is not None and math.isfinite(price) and price > 0:
        return price, "market feed"
    try:
        quotes = await app[GATEWAY].ltp(creds.api_key, creds.access_token or "", [f"{EXCHANGE}:{symbol}"])
    except BrokerError as exc:
        log.warning("last price unavailable; stop-loss not checked against it", symbol=symbol,
                    broker_error=exc.error_type)
        return None
    quote = quotes.get(f"{EXCHANGE}:{symbol}") or {}
    price = quote.get("last_price")
    return (float(price), "broker") if isinstance(price, int | float) and price > 0 else None


async def check_stop_loss(app: web.Application, creds: Credentials, symbol: str, stop_loss: float,
                          allowed: bool) -> None:
    """422 if the stop-loss is at or above the last price (it would sell right after the BUY), unless allowed."""
    if allowed:
        return
    found = await last_price(app, creds, symbol)
    if found is None or stop_loss < found[0]:
        return
    price, source = found
    raise ApiError(422, "stop_loss_above_price",
                   f"stop_loss {stop_loss} is at or above the last price of {symbol}, {price} ({source}): the "
                   "strategy would sell right after it buys. Lower it, or send allow_stop_loss_above_price: true",
                   [{"loc": ["stop_loss"], "msg": "stop_loss must be below the last price", "type": "above_price",
                     "last_price": price, "price_source": source}])


def not_while_running(row: Strategy, action: str) -> None:
    if row.status == StrategyStatus.running:
        raise ApiError(409, "strategy_running", f"stop the strategy before you {action} it")


async def create(request: web.Request) -> web.Response:
    """Create a strategy in status `created`."""
    user_id = current_user(request)
    body = await read_model(request, StrategyCreateRequest)
    check_times(request.app, body.buy_time, body.sell_time)
    # Checked here, not only when the instrument cache is empty: the answer must not
    # depend on whether another user filled that cache today.
    async with request.app[SESSIONS]() as session:
        creds = require_valid(await load_credentials(request.app, session, user_id))
    await instrument_token(request.app, user_id, body.symbol)
    await check_stop_loss(request.app, creds, body.symbol, body.stop_loss, body.allow_stop_loss_above_price)
    row = Strategy(user_id=user_id, symbol=body.symbol, buy_time=body.buy_time, sell_time=body.sell_time,
                   stop_loss=body.stop_loss, quantity=body.quantity, status=StrategyStatus.created,
                   repeat=body.repeat, weekdays=weekday_numbers(body.weekdays))
    async with request.app[SESSIONS]() as session:
        session.add(row)
        try:
            await session.commit()
        except IntegrityError:
            raise ApiError(401, "invalid_token", "the access token's user no longer exists") from None
        await session.refresh(row)
    log.info("strategy created", strategy_id=str(row.id), user_id=str(user_id), symbol=row.symbol)
    return json_response(strategy_out(row), status=201)


async def get_one(request: web.Request) -> web.Response:
    """Return one of the caller's strategies."""
    user_id = current_user(request)
    strategy_id = path_uuid(request)
    async with request.app[READS]() as session:
        return json_response(strategy_out(await own_strategy(session, user_id, strategy_id)))


async def patch(request: web.Request) -> web.Response:
    """Change given fields of a strategy that is not running."""
    user_id = current_user(request)
    strategy_id = path_uuid(request)
    body = await read_model(request, StrategyUpdateRequest)
    changes = body.model_dump(exclude_unset=True)
    for name, value in changes.items():
        if value is None and name != "weekdays":  # weekdays: null = every trading day
            raise field_error([name], f"{name} cannot be null; leave it out to keep it", "null_not_allowed")
    if "weekdays" in changes:
        changes["weekdays"] = weekday_numbers(changes["weekdays"])
    async with request.app[SESSIONS]() as session:
        row = await own_strategy(session, user_id, strategy_id)
        not_while_running(row, "change")
    check_times(request.app, changes.get("buy_time", row.buy_time), changes.get("sell_time", row.sell_time))
    if "symbol" in changes and changes["symbol"] != row.symbol:
        await instrument_token(request.app, user_id, changes["symbol"])
    async with request.app[SESSIONS]() as session:
        row = await own_strategy(session, user_id, strategy_id, for_update=True)
        not_while_running(row, "change")
        merged_buy, merged_sell = changes.get("buy_time", row.buy_time), changes.get("sell_time", row.sell_time)
        if not merged_buy < merged_sell:  # changed by a concurrent PATCH meanwhile
            raise field_error(["sell_time"], "buy_time must be before sell_time", "buy_before_sell")
        if changes.get("repeat", row.repeat) == "once" and changes.get("weekdays", row.weekdays) is not None:
            if "repeat" not in changes:
                raise field_error(["weekdays"], "weekdays need repeat `trading_days`", "weekdays_need_repeat")
            changes["weekdays"] = None  # back to one-off: the weekday choice goes with it
        for name, value in changes.items():
            setattr(row, name, value)
        await session.commit()
        await session.refresh(row)
    log.info("strategy updated", strategy_id=str(strategy_id), fields=sorted(changes))
    return json_response(strategy_out(row))


async def delete(request: web.Request) -> web.Response:
    """Delete a strategy that is not running; its order log stays (GET /strategies/{id}/orders)."""
    user_id = current_user(request)
    strategy_id = path_uuid(request)
    async with request.app[SESSIONS]() as session:
        row = await own_strategy(session, user_id, strategy_id, for_update=True)
        not_while_running(row, "delete")
        if await request.app[REDIS].exists(keys.strategy_key(strategy_id)):
            raise ApiError(409, "strategy_exiting", "a square-off of this strategy is still in progress")
        row.deleted_at = func.now()
        await session.commit()
    log.info("strategy deleted", strategy_id=str(strategy_id))
    return web.Response(status=204)
