"""Kite's order: its statuses, fills and history, rendered as the API and order updates show them.

An order's history is a list of snapshots (one per status it went through),
so `GET /orders/{id}` shows the quantity, prices and fills as they were at
each step, as Kite's does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from services.kite_sim.market import Instrument

if TYPE_CHECKING:
    from services.kite_sim.book import Account

IST = ZoneInfo("Asia/Kolkata")
PUT_RECEIVED = "PUT ORDER REQ RECEIVED"
VALIDATION_PENDING, OPEN_PENDING = "VALIDATION PENDING", "OPEN PENDING"
OPEN, TRIGGER_PENDING = "OPEN", "TRIGGER PENDING"
MODIFY_VALIDATION_PENDING, MODIFY_PENDING, MODIFIED = "MODIFY VALIDATION PENDING", "MODIFY PENDING", "MODIFIED"
CANCEL_PENDING = "CANCEL PENDING"
COMPLETE, CANCELLED, REJECTED = "COMPLETE", "CANCELLED", "REJECTED"
UPDATE = "UPDATE"  # what order updates say for a partial fill or a modification
DONE = frozenset({COMPLETE, CANCELLED, REJECTED})
LIVE = frozenset({OPEN, TRIGGER_PENDING})  # what can be modified or cancelled
BEFORE_EXCHANGE = frozenset({PUT_RECEIVED, VALIDATION_PENDING, OPEN_PENDING, REJECTED})
MARKET_TYPES = frozenset({"MARKET", "SL-M"})
TRIGGER_TYPES = frozenset({"SL", "SL-M"})

# One order-history entry: (status, at, message, filled_quantity, filled_value (paise*shares),
# quantity, price_paise, trigger_paise, order_type, cancelled_quantity).
HistoryEntry = tuple[str, float, str | None, int, int, int, int, int, str, int]


def kite_time(epoch: float) -> str:
    """Format an epoch as Kite does: IST wall clock, second precision."""
    second = math.floor(epoch)
    if round((epoch - second) * 1e6) >= 1_000_000:  # datetime rounds to the microsecond first
        second += 1
    return _kite_second(second)


@functools.lru_cache(maxsize=4096)
def _kite_second(second: int) -> str:
    # Every order renders its times on every GET (three per history entry): a cache per second
    # turns ~2.5 us of datetime formatting into a dict lookup.
    return datetime.fromtimestamp(second, IST).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(slots=True)
class Fill:
    """One trade against an order."""

    trade_id: str
    quantity: int
    price_paise: int
    at: float


@dataclass(slots=True)
class Order:
    """An order and its state transitions (the order history)."""

    order_id: str
    account: Account
    instrument: Instrument
    variety: str
    transaction_type: str
    quantity: int
    product: str
    order_type: str
    validity: str
    price_paise: int
    market_protection: float
    tag: str | None
    received_at: float
    received_mono: float
    trigger_paise: int = 0
    status: str = PUT_RECEIVED
    status_message: str | None = None
    filled_quantity: int = 0
    filled_value: int = 0  # sum of quantity * price_paise over the fills
    cancelled_quantity: int = 0
    modifications: int = 0
    updated_at: float = 0.0
    fills: list[Fill] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)

    @property
    def pending_quantity(self) -> int:
        return 0 if self.status in DONE else self.quantity - self.filled_quantity

    @property
    def average_price(self) -> float:
        """Return the volume-weighted average fill price in rupees (0 before any fill)."""
        return self.filled_value / self.filled_quantity / 100 if self.filled_quantity else 0.0

    def snapshot(self) -> HistoryEntry:
        return (self.status, self.updated_at, self.status_message, self.filled_quantity, self.filled_value,
                self.quantity, self.price_paise, self.trigger_paise, self.order_type, self.cancelled_quantity)

    def transition(self, status: str, at: float, message: str | None = None) -> None:
        """Move to a new status and record it in the history."""
        self.status = status
        self.status_message = message
        self.updated_at = at
        # The snapshot, inlined: five of these per order are on the simulator's hottest path.
        self.history.append((status, at, message, self.filled_quantity, self.filled_value, self.quantity,
                             self.price_paise, self.trigger_paise, self.order_type, self.cancelled_quantity))

    def pass_through(self, statuses: tuple[str, ...], at: float) -> None:
        """Record statuses the order goes through at once (no message, nothing else changing)."""
        rest = (at, None, self.filled_quantity, self.filled_value, self.quantity, self.price_paise,
                self.trigger_paise, self.order_type, self.cancelled_quantity)
        append = self.history.append
        for status in statuses:
            append((status, *rest))
        self.status, self.status_message, self.updated_at = statuses[-1], None, at

    def as_kite(self, entry: HistoryEntry | None = None) -> dict[str, Any]:
        """Render the order (or one history entry) as Kite's order dict."""
        return self._entry_as_kite(self._kite_base(), entry or self.snapshot())

    def history_as_kite(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """Render the history entries from `start` on, oldest first, as `as_kite(entry)` does.

        The dicts share their nested `meta` and `tags` with each other: encode
        them, do not change them.
        """
        base = self._kite_base()
        for entry in self.history[start:]:
            yield self._entry_as_kite(base.copy(), entry)

    def _kite_base(self) -> dict[str, Any]:
        # Kite's keys in Kite's order: what no history entry changes is filled in here, the rest in
        # _entry_as_kite. A history is rendered as copies of one base (a dict copy is much cheaper
        # than building 33 keys again, and the history read follows every order placed).
        ins = self.instrument
        mp = self.market_protection
        return {
            "placed_by": self.account.user_id,
            "order_id": self.order_id,
            "exchange_order_id": None,
            "parent_order_id": None,
            "status": None,
            "status_message": None,
            "status_message_raw": None,
            "order_timestamp": None,
            "exchange_update_timestamp": None,
            "exchange_timestamp": None,
            "variety": self.variety,
            "modified": self.modifications > 0,
            "exchange": ins.exchange,
            "tradingsymbol": ins.tradingsymbol,
            "instrument_token": ins.instrument_token,
            "order_type": None,
            "transaction_type": self.transaction_type,
            "validity": self.validity,
            "validity_ttl": 0,
            "product": self.product,
            "quantity": None,
            "disclosed_quantity": 0,
            "price": None,
            "trigger_price": None,
            "average_price": None,
            "filled_quantity": None,
            "pending_quantity": None,
            "cancelled_quantity": None,
            "market_protection": int(mp) if mp == int(mp) else mp,
            "meta": {},
            "tag": self.tag,
            "tags": [self.tag] if self.tag else [],
            "guid": self.order_id,
        }

    def _entry_as_kite(self, data: dict[str, Any], entry: HistoryEntry) -> dict[str, Any]:
        status, at, message, filled, value, quantity, price, trigger, order_type, cancelled = entry
        at_time = kite_time(at)
        data["status"] = status
        data["status_message"] = data["status_message_raw"] = message
        data["order_timestamp"] = at_time
        if status not in BEFORE_EXCHANGE:
            data["exchange_order_id"] = f"1{self.order_id[-15:]}"
            data["exchange_update_timestamp"] = at_time
            data["exchange_timestamp"] = kite_time(self.received_at)
        data["order_type"] = order_type
        data["quantity"] = quantity
        data["price"] = price / 100
        data["trigger_price"] = trigger / 100
        data["average_price"] = value / filled / 100 if filled else 0.0
        data["filled_quantity"] = filled
        data["pending_quantity"] = 0 if status in DONE else quantity - filled
        data["cancelled_quantity"] = cancelled
        return data

    def trades_as_kite(self) -> list[dict[str, Any]]:
        """Render the order's fills as Kite's trade dicts."""
        ins = self.instrument
        return [
            {
                "trade_id": f.trade_id,
                "order_id": self.order_id,
                "exchange_order_id": f"1{self.order_id[-15:]}",
                "tradingsymbol": ins.tradingsymbol,
                "exchange": ins.exchange,
                "instrument_token": ins.instrument_token,
                "product": self.product,
                "average_price": f.price_paise / 100,
                "quantity": f.quantity,
                "transaction_type": self.transaction_type,
                "fill_timestamp": kite_time(f.at),
                "order_timestamp": kite_time(self.received_at),
                "exchange_timestamp": kite_time(f.at),
            }
            for f in self.fills
        ]

    def as_admin(self) -> dict[str, Any]:
        """Render the order for the admin listing (what the broker received)."""
        return {
            "order_id": self.order_id,
            "api_key": self.account.api_key,
            "user_id": self.account.user_id,
            "tag": self.tag,
            "tradingsymbol": self.instrument.tradingsymbol,
            "exchange": self.instrument.exchange,
            "transaction_type": self.transaction_type,
            "quantity": self.quantity,
            "filled_quantity": self.filled_quantity,
            "order_type": self.order_type,
            "product": self.product,
            "variety": self.variety,
            "price": self.price_paise / 100,
            "trigger_price": self.trigger_paise / 100,
            "status": self.status,
            "status_message": self.status_message,
            "average_price": self.average_price,
            "trades": len(self.fills),
            "order_timestamp": kite_time(self.received_at),
            "received_at": self.received_at,
            "received_at_monotonic": self.received_mono,
        }
