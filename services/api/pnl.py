"""Money of a strategy run from confirmed fills: entry and exit average prices, quantity, P&L.

Only what the broker confirmed counts: the `average_price` and
`filled_quantity` of COMPLETE orders, as the executor recorded them in the
successful order-log rows of the run (a RETRY row that filled counts as the
order it retried; a row rebuilt by reconciliation as its exit). While the run
is loaded, `runtime:{id}` holds the fill price of its BUY before the row
reaches Postgres. Requested prices (the stop-loss, a tick) are never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession

from libs.schema.models import EventType, OrderLogStatus, Position
from libs.schema.tables import OrderLog, Strategy

FILL_EVENTS = (EventType.BUY, EventType.SELL, EventType.STOPLOSS, EventType.RETRY)
_EXIT_POSITION = {EventType.SELL: Position.sold, EventType.STOPLOSS: Position.exited_by_sl}


@dataclass
class RunFills:
    """The confirmed fills of one strategy run."""

    entered: bool = False
    entry_price: float | None = None
    quantity: int | None = None
    exit_price: float | None = None
    exit_kind: EventType | None = None  # SELL or STOPLOSS
    entry_at: datetime | None = None
    exit_at: datetime | None = None

    @property
    def position(self) -> Position:
        if self.exit_kind is not None:
            return _EXIT_POSITION[self.exit_kind]
        return Position.bought if self.entered else Position.none

    @property
    def last_at(self) -> datetime | None:
        return self.exit_at or self.entry_at


def fill_kind(row: OrderLog) -> EventType | None:
    """Return BUY, SELL or STOPLOSS for a row that records a fill, else None."""
    if row.status != OrderLogStatus.success:
        return None
    kind = row.event_type
    if kind == EventType.RETRY:
        try:
            kind = EventType((row.request_payload or {}).get("retry_of", ""))
        except ValueError:
            return None
    return kind if kind in (EventType.BUY, EventType.SELL, EventType.STOPLOSS) else None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and number not in (float("inf"), float("-inf")) and number > 0 else None


@dataclass(frozen=True)
class Fill:
    """One confirmed fill; an exit carries the realized P&L of its round trip."""

    row: OrderLog
    kind: EventType
    price: float | None  # None only if the broker reported none (then no P&L either)
    quantity: int | None
    pnl: float | None


def walk_fills(rows: list[OrderLog], quantities: dict[UUID, int]) -> list[Fill]:
    """Return the fills among order-log rows (oldest first), pairing each exit with its strategy's entry."""
    entries: dict[UUID, tuple[float | None, int | None]] = {}
    out: list[Fill] = []
    for row in rows:
        kind = fill_kind(row)
        response = row.response_payload or {}
        price = _number(response.get("average_price"))
        if kind is None:
            continue
        if kind == EventType.BUY:
            filled = _number(response.get("filled_quantity"))
            quantity = int(filled) if filled else quantities.get(row.strategy_id)
            entries[row.strategy_id] = (price, quantity)
            out.append(Fill(row, kind, price, quantity, None))
            continue
        entry_price, quantity = entries.pop(row.strategy_id, (None, None))
        pnl = round((price - entry_price) * quantity, 2) if price and entry_price and quantity else None
        out.append(Fill(row, kind, price, quantity, pnl))
    return out


def fills_from_rows(rows: list[OrderLog], default_quantity: int) -> RunFills:
    """Fold one run's order-log rows (oldest first) into its fills."""
    fills = RunFills()
    for fill in walk_fills(rows, {row.strategy_id: default_quantity for row in rows}):
        if fill.kind == EventType.BUY:
            fills.entered = True
            fills.entry_price, fills.quantity, fills.entry_at = fill.price, fill.quantity, fill.row.created_at
        else:
            fills.exit_price, fills.exit_kind, fills.exit_at = fill.price, fill.kind, fill.row.created_at
    return fills


def money(fills: RunFills, last_price: float | None) -> dict[str, Any]:
    """Return the money fields of a status: average prices, quantity, realized and unrealized P&L."""
    entry, qty, exit_ = fills.entry_price, fills.quantity, fills.exit_price
    realized = round((exit_ - entry) * qty, 2) if entry is not None and exit_ is not None and qty else None
    unrealized = None
    if entry is not None and exit_ is None and qty and last_price is not None:
        unrealized = round((last_price - entry) * qty, 2)
    return {"entry_average_price": entry, "exit_average_price": exit_, "filled_quantity": qty,
            "realized_pnl": realized, "unrealized_pnl": unrealized}


async def latest_run_fills(session: AsyncSession, strategies: list[Strategy]) -> dict[UUID, RunFills]:
    """Return the fills of each strategy's latest run (one query for all of them)."""
    started = [s for s in strategies if s.started_at is not None]
    out = {s.id: RunFills() for s in strategies}
    if not started:
        return out
    stmt = (select(OrderLog)
            .join(Strategy, and_(Strategy.id == OrderLog.strategy_id, OrderLog.created_at >= Strategy.started_at))
            .where(OrderLog.strategy_id.in_([s.id for s in started]), OrderLog.status == OrderLogStatus.success,
                   OrderLog.event_type.in_(FILL_EVENTS))
            .order_by(OrderLog.created_at, OrderLog.id))
    rows: dict[UUID, list[OrderLog]] = {}
    for row in await session.scalars(stmt):
        rows.setdefault(row.strategy_id, []).append(row)
    for strategy in started:
        out[strategy.id] = fills_from_rows(rows.get(strategy.id, []), strategy.quantity)
    return out
