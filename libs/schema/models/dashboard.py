"""Model what the dashboard reads: strategies with money, positions, the day's summary, the trade book."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from libs.schema.models.api import StatusResponse, StrategyOut
from libs.schema.models.types import EventType, StrategyStatus

__all__ = ["PositionOut", "PositionStrategy", "StrategyListItem", "StreamTicketOut", "SummaryOut", "TradeOut"]


class StrategyListItem(StrategyOut, StatusResponse):
    """A strategy with its live status and the money of its latest run."""


class PositionStrategy(BaseModel):
    """A Tickwise strategy whose tagged orders traded this position today."""

    id: UUID
    symbol: str
    status: StrategyStatus


class PositionOut(BaseModel):
    """One day position as the broker reports it."""

    model_config = ConfigDict(extra="ignore")

    symbol: str
    exchange: str | None = None
    product: str | None = None
    quantity: int
    average_price: float | None = None
    last_price: float | None = None
    pnl: float | None = None
    realised: float | None = None
    unrealised: float | None = None
    buy_quantity: int | None = None
    sell_quantity: int | None = None
    strategies: list[PositionStrategy] = Field(default_factory=list)


class SummaryOut(BaseModel):
    """Today's totals of the caller (IST trading day)."""

    trading_day: date
    mode: Literal["paper", "live"] = Field(description="paper: the bundled simulator; live: Zerodha Kite.")
    strategies_by_status: dict[str, int]
    orders_placed: int = Field(description="Distinct broker orders recorded today.")
    orders_filled: int
    realized_pnl: float = Field(description="P&L of today's closed round trips, from confirmed fills.")
    unrealized_pnl: float | None = None


class TradeOut(BaseModel):
    """One confirmed fill in the caller's trade book (kept after its strategy is deleted)."""

    id: UUID
    strategy_id: UUID
    symbol: str | None
    side: Literal["BUY", "SELL"]
    kind: EventType = Field(description="BUY, SELL (scheduled or square-off) or STOPLOSS.")
    quantity: int | None
    average_price: float
    realized_pnl: float | None = Field(None, description="On an exit: (exit - entry) x quantity of its run.")
    broker_order_id: str | None
    tag: str | None
    trading_day: date
    filled_at: datetime


class StreamTicketOut(BaseModel):
    """A short-lived ticket that opens the caller's live event stream (EventSource cannot send headers)."""

    ticket: str = Field(repr=False)
    expires_in: int
    url: str
