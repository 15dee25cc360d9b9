"""The caller's trade book (confirmed fills, JSON or CSV) and today's summary.

The trade book reads `order_logs` by the caller's `user_id`, so it keeps the
fills of strategies that were deleted since; the strategy's symbol comes from
an outer join (a deleted strategy's rows fall back to the symbol of the
order that was sent).
"""

from __future__ import annotations

import csv
import io
from datetime import date, datetime, timedelta
from typing import Any
from uuid import UUID

from aiohttp import web
from sqlalchemy import func, select

from libs.schema.models import OrderLogStatus, StrategyStatus
from libs.schema.models.dashboard import SummaryOut, TradeOut
from libs.schema.tables import OrderLog, Strategy
from libs.trading.calendar import IST
from services.api.deps import READS, SETTINGS, current_user
from services.api.errors import field_error, json_response
from services.api.pnl import FILL_EVENTS, walk_fills
from services.api.status import build_statuses

TRADES_DEFAULT_LIMIT, TRADES_MAX_LIMIT = 500, 5000
MAX_RANGE_DAYS = 366
CSV_COLUMNS = ("filled_at", "trading_day", "symbol", "kind", "side", "quantity", "average_price", "realized_pnl",
               "broker_order_id", "tag", "strategy_id")


def today() -> date:
    """Return today's date in IST (the trading day's calendar)."""
    return datetime.now(IST).date()


def _day(request: web.Request, name: str, default: date) -> date:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise field_error(["query", name], f"{name} must be a date like 2025-02-25", "date_format") from None


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", str(TRADES_DEFAULT_LIMIT))
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not 1 <= int(text) <= TRADES_MAX_LIMIT:
        raise field_error(["query", "limit"], f"limit must be a whole number from 1 to {TRADES_MAX_LIMIT}",
                          "limit_range")
    return int(text)


async def _fill_rows(request: web.Request, user_id: UUID, first: date, last: date,
                     limit: int) -> list[tuple[OrderLog, str | None, int | None]]:
    """Return the newest `limit` fill rows of the caller in the range, oldest first, with symbol and quantity."""
    stmt = (select(OrderLog, Strategy.symbol, Strategy.quantity)
            .outerjoin(Strategy, Strategy.id == OrderLog.strategy_id)
            .where(OrderLog.user_id == user_id, OrderLog.status == OrderLogStatus.success,
                   OrderLog.event_type.in_(FILL_EVENTS), OrderLog.trading_day >= first, OrderLog.trading_day <= last)
            .order_by(OrderLog.created_at.desc(), OrderLog.id.desc()).limit(limit))
    async with request.app[READS]() as session:
        rows = (await session.execute(stmt)).all()
    return [(row, symbol, quantity) for row, symbol, quantity in reversed(rows)]


def _trades(rows: list[tuple[OrderLog, str | None, int | None]]) -> list[dict[str, Any]]:
    symbols = {row.strategy_id: symbol for row, symbol, _ in rows}
    quantities = {row.strategy_id: quantity for row, _, quantity in rows if quantity is not None}
    out = []
    for fill in walk_fills([row for row, _, _ in rows], quantities):
        if fill.price is None:
            continue
        row = fill.row
        order = (row.request_payload or {}).get("order") or {}
        trade = TradeOut(id=row.id, strategy_id=row.strategy_id,
                         symbol=symbols.get(row.strategy_id) or order.get("symbol"),
                         side="BUY" if fill.kind.value == "BUY" else "SELL", kind=fill.kind,
                         quantity=fill.quantity, average_price=fill.price, realized_pnl=fill.pnl,
                         broker_order_id=row.broker_order_id, tag=row.tag, trading_day=row.trading_day,
                         filled_at=row.created_at)
        out.append(trade.model_dump(mode="json"))
    out.reverse()  # newest first
    return out


async def trade_book(request: web.Request) -> web.StreamResponse:
    """Return the caller's confirmed fills, newest first (`?from=&to=&limit=&format=csv`)."""
    user_id = current_user(request)
    last = _day(request, "to", today())
    first = _day(request, "from", last - timedelta(days=30))
    if first > last:
        raise field_error(["query", "from"], "from must be on or before to", "date_order")
    if (last - first).days > MAX_RANGE_DAYS:
        raise field_error(["query", "from"], f"ask for at most {MAX_RANGE_DAYS} days at once", "date_range")
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise field_error(["query", "format"], "format must be json or csv", "format_choice")
    trades = _trades(await _fill_rows(request, user_id, first, last, _limit(request)))
    if fmt == "json":
        return json_response(trades)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(trades)
    name = f"tickwise-trades-{first.isoformat()}-{last.isoformat()}.csv"
    return web.Response(text=buffer.getvalue(), content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"',
                                 "Cache-Control": "no-store"})


async def summary(request: web.Request) -> web.Response:
    """Return today's totals: strategies by status, orders placed and filled, realized and open P&L."""
    user_id = current_user(request)
    day = today()
    async with request.app[READS]() as session:
        counts = dict((await session.execute(
            select(Strategy.status, func.count()).where(Strategy.user_id == user_id, Strategy.deleted_at.is_(None))
            .group_by(Strategy.status))).all())
        placed = await session.scalar(select(func.count(func.distinct(OrderLog.broker_order_id)))
                                      .where(OrderLog.user_id == user_id, OrderLog.trading_day == day,
                                             OrderLog.broker_order_id.is_not(None)))
        running = list(await session.scalars(select(Strategy).where(Strategy.user_id == user_id,
                                                                    Strategy.status == StrategyStatus.running)))
        statuses = await build_statuses(request.app, session, running)
    fills = walk_fills([row for row, _, _ in await _fill_rows(request, user_id, day, day, TRADES_MAX_LIMIT)],
                       {s.id: s.quantity for s in running})
    open_pnl = [s["unrealized_pnl"] for s in statuses if s.get("unrealized_pnl") is not None]
    out = SummaryOut(trading_day=day, mode="paper" if request.app[SETTINGS].kite_root else "live",
                     strategies_by_status={s.value: int(counts.get(s, 0)) for s in StrategyStatus},
                     orders_placed=int(placed or 0), orders_filled=len(fills),
                     realized_pnl=round(sum(f.pnl for f in fills if f.pnl is not None), 2),
                     unrealized_pnl=round(sum(open_pnl), 2) if open_pnl else None)
    return json_response(out.model_dump(mode="json"))
