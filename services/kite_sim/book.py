"""Accounts, order book, fills, positions and Kite's per-account order limits.

Every operation is O(1) in the number of orders, except listing an
account's orders and matching resting LIMIT orders of a symbol whose price
moved (O(open orders on that symbol)).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from services.kite_sim.market import Instrument, Market, Quote, round_to_tick

IST = ZoneInfo("Asia/Kolkata")
OPEN, COMPLETE, CANCELLED, REJECTED = "OPEN", "COMPLETE", "CANCELLED", "REJECTED"


def kite_time(epoch: float) -> str:
    """Format an epoch as Kite does: IST wall clock, second precision."""
    return datetime.fromtimestamp(epoch, IST).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(slots=True)
class Account:
    """A simulated Kite user with one api_key and one live access token."""

    api_key: str
    api_secret: str
    access_token: str
    user_id: str
    user_name: str
    daily_order_cap: int
    expired: bool = False
    request_tokens: set[str] = field(default_factory=set)
    orders: dict[str, Order] = field(default_factory=dict)
    positions: dict[tuple[str, str], Position] = field(default_factory=dict)
    recent_orders: deque[float] = field(default_factory=deque)
    orders_today: int = 0
    login_time: float = field(default_factory=time.time)


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
    status: str = OPEN
    status_message: str | None = None
    filled_quantity: int = 0
    average_paise: int = 0
    updated_at: float = 0.0
    fills: list[Fill] = field(default_factory=list)
    history: list[tuple[str, float, str | None, int, int]] = field(default_factory=list)

    def transition(self, status: str, at: float, message: str | None = None) -> None:
        """Move to a new status and record it in the history."""
        self.status = status
        self.status_message = message
        self.updated_at = at
        self.history.append((status, at, message, self.filled_quantity, self.average_paise))

    def as_kite(self, entry: tuple[str, float, str | None, int, int] | None = None) -> dict[str, Any]:
        """Render the order (or one history entry) as Kite's order dict."""
        status, at, message, filled, avg = entry or (
            self.status, self.updated_at, self.status_message, self.filled_quantity, self.average_paise)
        ins = self.instrument
        done = status in (COMPLETE, CANCELLED, REJECTED)
        return {
            "placed_by": self.account.user_id,
            "order_id": self.order_id,
            "exchange_order_id": None if status == REJECTED else f"1{self.order_id[-15:]}",
            "parent_order_id": None,
            "status": status,
            "status_message": message,
            "status_message_raw": message,
            "order_timestamp": kite_time(at),
            "exchange_update_timestamp": None if status == REJECTED else kite_time(at),
            "exchange_timestamp": None if status == REJECTED else kite_time(self.received_at),
            "variety": self.variety,
            "modified": False,
            "exchange": ins.exchange,
            "tradingsymbol": ins.tradingsymbol,
            "instrument_token": ins.instrument_token,
            "order_type": self.order_type,
            "transaction_type": self.transaction_type,
            "validity": self.validity,
            "validity_ttl": 0,
            "product": self.product,
            "quantity": self.quantity,
            "disclosed_quantity": 0,
            "price": self.price_paise / 100,
            "trigger_price": 0,
            "average_price": avg / 100,
            "filled_quantity": filled,
            "pending_quantity": 0 if done else self.quantity - filled,
            "cancelled_quantity": self.quantity - filled if status == CANCELLED else 0,
            "market_protection": self.market_protection,
            "meta": {},
            "tag": self.tag,
            "tags": [self.tag] if self.tag else [],
            "guid": self.order_id,
        }

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
            "status": self.status,
            "status_message": self.status_message,
            "average_price": self.average_paise / 100,
            "order_timestamp": kite_time(self.received_at),
            "received_at": self.received_at,
            "received_at_monotonic": self.received_mono,
        }


@dataclass(slots=True)
class Position:
    """Day position of one symbol and product."""

    instrument: Instrument
    product: str
    buy_quantity: int = 0
    buy_value: int = 0  # paise
    sell_quantity: int = 0
    sell_value: int = 0

    def as_kite(self, quote: Quote) -> dict[str, Any]:
        """Render as Kite's position dict, marked to the current price."""
        qty = self.buy_quantity - self.sell_quantity
        last = quote.last / 100
        buy_price = self.buy_value / self.buy_quantity / 100 if self.buy_quantity else 0.0
        sell_price = self.sell_value / self.sell_quantity / 100 if self.sell_quantity else 0.0
        avg = buy_price if qty > 0 else sell_price if qty < 0 else 0.0
        # Kite's day P&L: what was sold minus what was bought, plus the open quantity at the last price.
        pnl = round((self.sell_value - self.buy_value) / 100 + qty * last, 2)
        matched = min(self.buy_quantity, self.sell_quantity)
        realised = round(matched * (sell_price - buy_price), 2)
        ins = self.instrument
        return {
            "tradingsymbol": ins.tradingsymbol,
            "exchange": ins.exchange,
            "instrument_token": ins.instrument_token,
            "product": self.product,
            "quantity": qty,
            "overnight_quantity": 0,
            "multiplier": 1,
            "average_price": round(avg, 4),
            "close_price": quote.close / 100,
            "last_price": last,
            "value": round((self.sell_value - self.buy_value) / 100, 2),
            "pnl": pnl,
            "m2m": pnl,
            "unrealised": round(pnl - realised, 2),
            "realised": realised,
            "buy_quantity": self.buy_quantity,
            "buy_price": round(buy_price, 4),
            "buy_value": self.buy_value / 100,
            "buy_m2m": self.buy_value / 100,
            "sell_quantity": self.sell_quantity,
            "sell_price": round(sell_price, 4),
            "sell_value": self.sell_value / 100,
            "sell_m2m": self.sell_value / 100,
            "day_buy_quantity": self.buy_quantity,
            "day_buy_price": round(buy_price, 4),
            "day_buy_value": self.buy_value / 100,
            "day_sell_quantity": self.sell_quantity,
            "day_sell_price": round(sell_price, 4),
            "day_sell_value": self.sell_value / 100,
        }


class LimitExceeded(Exception):
    """An account went past one of Kite's order limits."""

    def __init__(self, message: str, per_second: bool) -> None:
        super().__init__(message)
        self.per_second = per_second


class Book:
    """Keep accounts and orders; fill MARKET orders, match LIMIT orders on price moves."""

    def __init__(self, market: Market, slippage_bps: float = 0.0, orders_per_second: int = 10,
                 daily_order_cap: int = 3000) -> None:
        self.market = market
        self.slippage = slippage_bps / 10_000
        self.orders_per_second = orders_per_second
        self.daily_order_cap = daily_order_cap
        self.accounts: dict[str, Account] = {}
        self.orders: dict[str, Order] = {}
        self.open_limits: dict[int, dict[str, Order]] = {}
        # Ids keep counting across resets so that an id is never reused in one process.
        self._order_seq = itertools.count(1)
        self._trade_seq = itertools.count(1)
        self._user_seq = itertools.count(1)
        self._day_prefix = datetime.now(IST).strftime("%y%m%d")
        market.listeners.append(self.match_limits)

    def reset(self) -> None:
        """Forget every account and order."""
        self.accounts.clear()
        self.orders.clear()
        self.open_limits.clear()

    def create_account(self, user_name: str | None = None, daily_order_cap: int | None = None) -> Account:
        """Open a new account with fresh credentials."""
        n = next(self._user_seq)
        account = Account(
            api_key=f"sim{secrets.token_hex(8)}",
            api_secret=secrets.token_hex(16),
            access_token=secrets.token_hex(16),
            user_id=f"SM{n:04d}",
            user_name=user_name or f"Paper Trader {n}",
            daily_order_cap=daily_order_cap or self.daily_order_cap,
        )
        self.accounts[account.api_key] = account
        return account

    def authenticate(self, api_key: str, access_token: str) -> Account | None:
        """Return the account if the token is its live one."""
        account = self.accounts.get(api_key)
        if account is None or account.expired or not secrets.compare_digest(account.access_token, access_token):
            return None
        return account

    def issue_request_token(self, account: Account) -> str:
        """Issue a one-time request_token, as Kite's login redirect would."""
        token = secrets.token_hex(16)
        account.request_tokens.add(token)
        return token

    def start_session(self, account: Account) -> None:
        """Rotate the access token after a successful token exchange."""
        account.access_token = secrets.token_hex(16)
        account.expired = False
        account.login_time = time.time()

    def count_order_request(self, account: Account, now_mono: float) -> None:
        """Apply Kite's per-second and daily order limits to one order request."""
        window = account.recent_orders
        while window and now_mono - window[0] >= 1.0:
            window.popleft()
        if len(window) >= self.orders_per_second:
            raise LimitExceeded("Too many requests", per_second=True)
        if account.orders_today >= account.daily_order_cap:
            raise LimitExceeded(
                f"Maximum allowed order requests exceeded ({account.daily_order_cap} per day)", per_second=False)
        window.append(now_mono)
        account.orders_today += 1

    def new_order(self, account: Account, ins: Instrument, *, variety: str, transaction_type: str, quantity: int,
                  product: str, order_type: str, validity: str, price_paise: int, market_protection: float,
                  tag: str | None) -> Order:
        """Record an accepted order request in the book, status OPEN."""
        now = time.time()
        order = Order(
            order_id=f"{self._day_prefix}{next(self._order_seq):09d}",
            account=account, instrument=ins, variety=variety, transaction_type=transaction_type,
            quantity=quantity, product=product, order_type=order_type, validity=validity,
            price_paise=price_paise, market_protection=market_protection, tag=tag,
            received_at=now, received_mono=time.monotonic(),
        )
        account.orders[order.order_id] = order
        self.orders[order.order_id] = order
        return order

    def reject(self, order: Order, message: str) -> None:
        """Reject an order before it reaches the exchange."""
        order.transition(REJECTED, time.time(), message)

    def execute(self, order: Order) -> None:
        """Open the order and fill it if the price allows."""
        order.transition(OPEN, time.time())
        quote = self.market.quote(order.instrument)
        if order.order_type == "MARKET":
            self._fill(order, self._market_fill_price(order, quote.last))
        elif self._crosses(order, quote.last):
            # A marketable LIMIT trades at the market, never worse than its limit.
            self._fill(order, self._limit_fill_price(order, quote.last))
        elif order.validity == "IOC":
            order.transition(CANCELLED, time.time(), "IOC order cancelled: no match")
        else:
            self.open_limits.setdefault(order.instrument.instrument_token, {})[order.order_id] = order

    def cancel(self, order: Order) -> bool:
        """Cancel a resting order; False if it is no longer open."""
        if order.status != OPEN:
            return False
        self.open_limits.get(order.instrument.instrument_token, {}).pop(order.order_id, None)
        order.transition(CANCELLED, time.time(), None)
        return True

    def match_limits(self, quotes: list[Quote]) -> None:
        """Fill resting LIMIT orders whose price the new ticks crossed."""
        if not self.open_limits:
            return
        for quote in quotes:
            resting = self.open_limits.get(quote.instrument.instrument_token)
            if not resting:
                continue
            for order in [o for o in resting.values() if self._crosses(o, quote.last)]:
                del resting[order.order_id]
                self._fill(order, self._limit_fill_price(order, quote.last))

    def positions_of(self, account: Account) -> list[dict[str, Any]]:
        """Render an account's positions marked to market."""
        return [p.as_kite(self.market.quote(p.instrument)) for p in account.positions.values()]

    def _market_fill_price(self, order: Order, last: int) -> int:
        ins = order.instrument
        sign = 1 if order.transaction_type == "BUY" else -1
        return round_to_tick(last * (1 + sign * self.slippage), ins.tick_paise)

    @staticmethod
    def _crosses(order: Order, last: int) -> bool:
        if order.transaction_type == "BUY":
            return last <= order.price_paise
        return last >= order.price_paise

    @staticmethod
    def _limit_fill_price(order: Order, last: int) -> int:
        if order.transaction_type == "BUY":
            return min(last, order.price_paise)
        return max(last, order.price_paise)

    def _fill(self, order: Order, price_paise: int) -> None:
        now = time.time()
        qty = order.quantity - order.filled_quantity
        order.fills.append(Fill(f"{next(self._trade_seq):08d}", qty, price_paise, now))
        total = order.average_paise * order.filled_quantity + price_paise * qty
        order.filled_quantity += qty
        order.average_paise = round(total / order.filled_quantity)
        order.transition(COMPLETE, now)
        self.market.record_fill(order.instrument, qty, price_paise)
        key = (order.instrument.tradingsymbol, order.product)
        pos = order.account.positions.get(key)
        if pos is None:
            pos = order.account.positions[key] = Position(order.instrument, order.product)
        if order.transaction_type == "BUY":
            pos.buy_quantity += qty
            pos.buy_value += qty * price_paise
        else:
            pos.sell_quantity += qty
            pos.sell_value += qty * price_paise

    # --- state file (store.py) ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Return the book's state: every container attribute and id counter; scalars are settings."""
        state: dict[str, Any] = {}
        for name, value in vars(self).items():
            if isinstance(value, itertools.count):
                # A count cannot be read without advancing it, so it is replaced by one at the same place.
                current = next(value)
                setattr(self, name, itertools.count(current))
                state[name] = current
            elif isinstance(value, (dict, list, set, deque)):
                state[name] = value
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what `snapshot` returned (attributes this version no longer has are ignored)."""
        for name, value in state.items():
            current = getattr(self, name, None)
            if isinstance(current, itertools.count):
                setattr(self, name, itertools.count(value))
            elif isinstance(current, (dict, list, set, deque)):
                setattr(self, name, value)
        for account in self.accounts.values():
            # Monotonic instants of the previous process mean nothing in this one.
            account.recent_orders.clear()
