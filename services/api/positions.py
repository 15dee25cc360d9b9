"""The caller's day positions as the broker reports them, with Tickwise's strategies attached.

A position is matched to a strategy through the order tags: the day's
order book says which tagged orders traded which symbol, and `order_logs`
says which strategy each tag belongs to. Broker failures answer in the one
JSON error shape (503 retry, 409 when the token needs a new login).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from uuid import UUID

from aiohttp import web
from sqlalchemy import select

from libs.broker.kite import BrokerError, BrokerErrorKind
from libs.schema import keys
from libs.schema.models.dashboard import PositionOut, PositionStrategy
from libs.schema.models.types import SYMBOL_PATTERN
from libs.schema.tables import OrderLog, Strategy
from services.api.broker import (
    broker_unavailable,
    credentials_invalid,
    load_credentials,
    mark_invalid,
    require_valid,
)
from services.api.deps import GATEWAY, READS, REDIS, SESSIONS, current_user
from services.api.errors import field_error, json_response
from services.api.tradebook import today

SYMBOL_RE = re.compile(SYMBOL_PATTERN)


async def positions(request: web.Request) -> web.Response:
    """Return the caller's day positions from the broker, each with the strategies that traded it."""
    user_id = current_user(request)
    async with request.app[SESSIONS]() as session:
        creds = require_valid(await load_credentials(request.app, session, user_id))
    gateway = request.app[GATEWAY]
    assert creds.access_token is not None
    try:
        book, orders = await asyncio.gather(gateway.positions(creds.api_key, creds.access_token),
                                            gateway.orders(creds.api_key, creds.access_token))
    except BrokerError as exc:
        if exc.kind == BrokerErrorKind.AUTH:
            await mark_invalid(request.app, user_id)
            raise credentials_invalid() from None
        raise broker_unavailable(exc) from None
    by_symbol = await _strategies_by_symbol(request, user_id, orders)
    out = []
    for item in (book or {}).get("day") or []:
        symbol = str(item.get("tradingsymbol") or "")
        position = PositionOut.model_validate({**item, "symbol": symbol,
                                               "strategies": by_symbol.get(symbol, [])})
        out.append(position.model_dump(mode="json"))
    return json_response(out)


async def _strategies_by_symbol(request: web.Request, user_id: UUID,
                                orders: list[dict[str, Any]]) -> dict[str, list[PositionStrategy]]:
    tags = {str(o.get("tag")): str(o.get("tradingsymbol") or "") for o in orders if o.get("tag")}
    if not tags:
        return {}
    stmt = (select(OrderLog.tag, Strategy.id, Strategy.symbol, Strategy.status).distinct()
            .join(Strategy, Strategy.id == OrderLog.strategy_id)
            .where(OrderLog.user_id == user_id, OrderLog.trading_day == today(), OrderLog.tag.in_(list(tags))))
    async with request.app[READS]() as session:
        rows = (await session.execute(stmt)).all()
    out: dict[str, list[PositionStrategy]] = {}
    for tag, sid, symbol, status in rows:
        listed = out.setdefault(tags[tag], [])
        if all(s.id != sid for s in listed):
            listed.append(PositionStrategy(id=sid, symbol=symbol, status=status))
    return out


async def quote(request: web.Request) -> web.Response:
    """Return a symbol's last price: the live tick if Tickwise watches it, else the broker's LTP."""
    user_id = current_user(request)
    symbol = request.query.get("symbol", "").strip().upper()
    if not SYMBOL_RE.fullmatch(symbol):
        raise field_error(["query", "symbol"], "must be 1-30 characters of A-Z, 0-9, &, _ or -", "symbol_format")
    raw = await request.app[REDIS].get(keys.price_key(symbol))
    if raw is not None:
        return json_response({"symbol": symbol, "last_price": float(raw), "source": "ticks"})
    async with request.app[SESSIONS]() as session:
        creds = require_valid(await load_credentials(request.app, session, user_id))
    assert creds.access_token is not None
    instrument = f"NSE:{symbol}"
    try:
        data = await request.app[GATEWAY].ltp(creds.api_key, creds.access_token, [instrument])
    except BrokerError as exc:
        if exc.kind == BrokerErrorKind.AUTH:
            await mark_invalid(request.app, user_id)
            raise credentials_invalid() from None
        raise broker_unavailable(exc) from None
    if instrument not in data:
        raise field_error(["query", "symbol"], f"{symbol} is not in the broker's NSE instrument list",
                          "unknown_symbol")
    return json_response({"symbol": symbol, "last_price": float(data[instrument]["last_price"]), "source": "broker"})
