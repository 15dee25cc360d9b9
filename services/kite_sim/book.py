"""Accounts, order book, fills, positions and Kite's per-account order limits.

Orders walk Kite's status sequence (PUT ORDER REQ RECEIVED, VALIDATION
PENDING, OPEN PENDING, then OPEN or TRIGGER PENDING, ..., COMPLETE,
CANCELLED or REJECTED) and fill against the seeded depth of depth.py: an
order larger than the displayed depth fills across several levels, one trade
per level. A MARKET (or triggered SL-M) order keeps filling as the refill loop
brings fresh liquidity until it is COMPLETE; a LIMIT order rests with what
is left and fills further on later ticks. SL and SL-M orders wait in TRIGGER
PENDING until a tick crosses their trigger price.

Every operation is O(1) in the number of orders, except listing an
account's orders and matching the resting, trigger-pending and working
orders of a symbol whose price moved (O(such orders on that symbol)).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from libs.service.clock import Clock, SystemClock
from services.kite_sim.depth import Liquidity
from services.kite_sim.market import Instrument, Market, Quote, round_to_tick
from services.kite_sim.orders import (
    CANCEL_PENDING,
    LIVE,
    MARKET_TYPES,
    MODIFIED,
    MODIFY_PENDING,
    MODIFY_VALIDATION_PENDING,
    OPEN_PENDING,
    PUT_RECEIVED,
    TRIGGER_PENDING,
    TRIGGER_TYPES,
    UPDATE,
    VALIDATION_PENDING,
)

# Re-exported: these lived here before orders.py and other modules import them from the book.
from services.kite_sim.orders import CANCELLED as CANCELLED
from services.kite_sim.orders import COMPLETE as COMPLETE
from services.kite_sim.orders import IST as IST
from services.kite_sim.orders import OPEN as OPEN
from services.kite_sim.orders import REJECTED as REJECTED
from services.kite_sim.orders import Fill as Fill
from services.kite_sim.orders import Order as Order
from services.kite_sim.orders import kite_time as kite_time

REFILL_INTERVAL_S = 0.1
OrderListener = Callable[[Order, str], None]


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
    postback_url: str | None = None
    redirect_url: str | None = None  # the Kite app's registered redirect URL (the browser login's target)


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


@dataclass(frozen=True, slots=True)
class Modification:
    """The new values of a modify request (already validated)."""

    quantity: int
    price_paise: int
    trigger_paise: int
    order_type: str
    market_protection: float


class Book:
    """Keep accounts and orders; fill them against the seeded depth as prices move."""

    def __init__(self, market: Market, slippage_bps: float = 0.0, orders_per_second: int = 10,
                 daily_order_cap: int = 3000, *, depth_quantity: int = 500, seed: int = 1,
                 clock: Clock | None = None) -> None:
        self.market = market
        self.slippage = slippage_bps / 10_000
        self.orders_per_second = orders_per_second
        self.daily_order_cap = daily_order_cap
        self.clock: Clock = clock or SystemClock()
        self.liquidity = Liquidity(seed, depth_quantity)
        self._defaults = (self.slippage, depth_quantity)
        self.accounts: dict[str, Account] = {}
        self.orders: dict[str, Order] = {}
        self.open_limits: dict[int, dict[str, Order]] = {}  # resting LIMIT (and triggered SL) orders
        self.triggers: dict[int, dict[str, Order]] = {}  # SL / SL-M orders in TRIGGER PENDING
        self.working: dict[str, Order] = {}  # MARKET orders waiting for liquidity to finish filling
        # When set, the exchange cancels what a MARKET order cannot fill from the displayed
        # depth at once (as Kite's market protection does) instead of waiting for refills.
        self.cancel_unfilled_market = False
        # A tuple, not a list: wiring, not state (a state file that saves the book's containers skips it).
        self.order_listeners: tuple[OrderListener, ...] = ()
        # Ids keep counting across resets so that an id is never reused in one process.
        self._order_seq = itertools.count(1)
        self._trade_seq = itertools.count(1)
        self._user_seq = itertools.count(1)
        self._day_prefix = datetime.now(IST).strftime("%y%m%d")
        market.listeners.append(self.match_orders)

    def reset(self) -> None:
        """Forget every account and order; restore the start-up liquidity settings."""
        self.accounts.clear()
        self.orders.clear()
        self.open_limits.clear()
        self.triggers.clear()
        self.working.clear()
        self.liquidity.reset()
        self.slippage, self.liquidity.depth_quantity = self._defaults
        self.cancel_unfilled_market = False

    def add_order_listener(self, listener: OrderListener) -> None:
        """Call `listener(order, status)` on every order update (OPEN, UPDATE, COMPLETE, ...)."""
        self.order_listeners += (listener,)

    def now(self) -> float:
        """Return the simulator's epoch time (its clock may be offset for tests)."""
        return self.clock.time()

    def create_account(self, user_name: str | None = None, daily_order_cap: int | None = None,
                       postback_url: str | None = None) -> Account:
        """Open a new account with fresh credentials."""
        n = next(self._user_seq)
        account = Account(
            api_key=f"sim{secrets.token_hex(8)}",
            api_secret=secrets.token_hex(16),
            access_token=secrets.token_hex(16),
            user_id=f"SM{n:04d}",
            user_name=user_name or f"Paper Trader {n}",
            daily_order_cap=daily_order_cap or self.daily_order_cap,
            postback_url=postback_url,
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
                  tag: str | None, trigger_paise: int = 0) -> Order:
        """Record an accepted order request in the book, up to VALIDATION PENDING."""
        now = self.now()
        order = Order(
            order_id=f"{self._day_prefix}{next(self._order_seq):09d}",
            account=account, instrument=ins, variety=variety, transaction_type=transaction_type,
            quantity=quantity, product=product, order_type=order_type, validity=validity,
            price_paise=price_paise, market_protection=market_protection, tag=tag,
            received_at=now, received_mono=time.monotonic(), trigger_paise=trigger_paise,
        )
        order.pass_through((PUT_RECEIVED, VALIDATION_PENDING), now)
        account.orders[order.order_id] = order
        self.orders[order.order_id] = order
        return order

    def reject(self, order: Order, message: str) -> None:
        """Reject an order before it reaches the exchange."""
        order.transition(REJECTED, self.now(), message)
        self._announce(order, REJECTED)

    def execute(self, order: Order) -> None:
        """Send the order to the exchange: wait for its trigger, or open it and fill what the depth allows."""
        now = self.now()
        if order.order_type in TRIGGER_TYPES:
            order.pass_through((OPEN_PENDING, TRIGGER_PENDING), now)
            self.triggers.setdefault(order.instrument.instrument_token, {})[order.order_id] = order
            self._announce(order, TRIGGER_PENDING)
            return
        order.pass_through((OPEN_PENDING, OPEN), now)
        self._announce(order, OPEN)
        self._work(order)

    def cancel(self, order: Order) -> bool:
        """Cancel what is left of an open or trigger-pending order; False if it is no longer live."""
        if order.status not in LIVE:
            return False
        self._unpark(order)
        now = self.now()
        order.transition(CANCEL_PENDING, now)
        order.cancelled_quantity = order.quantity - order.filled_quantity
        order.transition(CANCELLED, now)
        self._announce(order, CANCELLED)
        return True

    def modify(self, order: Order, change: Modification) -> bool:
        """Apply a validated modification to a live order; False if it is no longer live."""
        if order.status not in LIVE:
            return False
        self._unpark(order)
        now = self.now()
        back_to = order.status
        order.pass_through((MODIFY_VALIDATION_PENDING, MODIFY_PENDING), now)
        order.quantity, order.price_paise = change.quantity, change.price_paise
        order.trigger_paise, order.order_type = change.trigger_paise, change.order_type
        order.market_protection = change.market_protection
        order.modifications += 1
        order.transition(MODIFIED, now)
        self._announce(order, UPDATE)
        if order.order_type in TRIGGER_TYPES and back_to == TRIGGER_PENDING:
            order.transition(TRIGGER_PENDING, now)
            self.triggers.setdefault(order.instrument.instrument_token, {})[order.order_id] = order
        else:
            order.transition(OPEN, now)
            self._work(order)
        return True

    def match_orders(self, quotes: list[Quote]) -> None:
        """On new ticks: fire crossed triggers, fill crossed LIMIT orders, go on filling MARKET orders."""
        if not (self.open_limits or self.triggers or self.working):
            return
        working = {o.instrument.instrument_token for o in self.working.values()}
        for quote in quotes:
            token = quote.instrument.instrument_token
            pending = self.triggers.get(token)
            if pending:
                for order in [o for o in pending.values() if self._triggered(o, quote.last)]:
                    del pending[order.order_id]
                    order.transition(OPEN, self.now())
                    self._announce(order, OPEN)
                    self._work(order)
                if not pending:
                    del self.triggers[token]
            if token in working:
                for order in [o for o in self.working.values() if o.instrument.instrument_token == token]:
                    self._continue_market(order)
            resting = self.open_limits.get(token)
            if resting:
                for order in [o for o in resting.values() if self._crosses(o, quote.last)]:
                    self._take(order, order.price_paise)
                    if order.status != OPEN:
                        del resting[order.order_id]
                if not resting:
                    del self.open_limits[token]

    def refill(self) -> None:
        """Bring fresh liquidity to instruments with unfinished MARKET orders and fill on."""
        if not self.working:
            return
        for token in {o.instrument.instrument_token for o in self.working.values()}:
            self.liquidity.refill(token)
        for order in list(self.working.values()):
            self._continue_market(order)

    async def run_refills(self, interval_s: float = REFILL_INTERVAL_S) -> None:
        """Refill liquidity forever, so every MARKET order ends COMPLETE within a few intervals."""
        while True:
            await asyncio.sleep(interval_s)
            self.refill()

    def positions_of(self, account: Account) -> list[dict[str, Any]]:
        """Render an account's positions marked to market."""
        return [p.as_kite(self.market.quote(p.instrument)) for p in account.positions.values()]

    def depth_of(self, ins: Instrument) -> dict[str, list[dict[str, int | float]]]:
        """Return the displayed depth (what fills left of it) in Kite's quote shape."""
        quote = self.market.quote(ins)
        book = {}
        for key, side in (("buy", "SELL"), ("sell", "BUY")):  # bids are what a SELL takes
            book[key] = [{"price": lvl.price / 100, "quantity": lvl.quantity, "orders": 1}
                         for lvl in self.liquidity.levels(quote, side)]
        return book

    def _announce(self, order: Order, status: str) -> None:
        for listener in self.order_listeners:
            listener(order, status)

    def _unpark(self, order: Order) -> None:
        token = order.instrument.instrument_token
        for parked in (self.open_limits, self.triggers):
            orders = parked.get(token)
            if orders is not None:
                orders.pop(order.order_id, None)
                if not orders:
                    del parked[token]  # keeps the "nothing to match" check of every tick O(1)
        self.working.pop(order.order_id, None)

    def _work(self, order: Order) -> None:
        """Fill an OPEN order as far as the depth allows; park what is left."""
        market = order.order_type in MARKET_TYPES
        self._take(order, None if market else order.price_paise)
        if order.status != OPEN:
            return
        if market and self.cancel_unfilled_market:
            self._cancel_rest(order, "market protection: the unfilled quantity was cancelled by the exchange")
        elif market:
            self.working[order.order_id] = order
        elif order.validity == "IOC":
            self._cancel_rest(order, "IOC order cancelled: no match" if not order.filled_quantity
                              else "IOC order partially filled; the rest is cancelled")
        else:
            self.open_limits.setdefault(order.instrument.instrument_token, {})[order.order_id] = order

    def _cancel_rest(self, order: Order, message: str) -> None:
        """End an OPEN order as the exchange would: what filled stays filled, the rest is cancelled."""
        order.cancelled_quantity = order.quantity - order.filled_quantity
        order.transition(CANCELLED, self.now(), message)
        self._announce(order, CANCELLED)

    def _continue_market(self, order: Order) -> None:
        self._take(order, None)
        if order.status != OPEN:
            self.working.pop(order.order_id, None)

    def _take(self, order: Order, limit_paise: int | None) -> None:
        """Fill against the depth, one trade per level, at most down (or up) to the limit."""
        remaining = order.quantity - order.filled_quantity
        levels = self.liquidity.take(self.market.quote(order.instrument), order.transaction_type, remaining,
                                     limit_paise)
        if not levels:
            return
        now = self.now()
        taken = 0
        for price, qty in levels:
            self._fill(order, qty, price if limit_paise is not None else self._slipped(order, price), now)
            taken += qty
        if taken == remaining:
            order.transition(COMPLETE, now)
            self._announce(order, COMPLETE)
        else:
            order.transition(OPEN, now)  # the history shows the fill progressing
            self._announce(order, UPDATE)

    def _slipped(self, order: Order, paise: int) -> int:
        sign = 1 if order.transaction_type == "BUY" else -1
        return round_to_tick(paise * (1 + sign * self.slippage), order.instrument.tick_paise)

    @staticmethod
    def _triggered(order: Order, last: int) -> bool:
        if order.transaction_type == "BUY":
            return last >= order.trigger_paise
        return last <= order.trigger_paise

    @staticmethod
    def _crosses(order: Order, last: int) -> bool:
        if order.transaction_type == "BUY":
            return last <= order.price_paise
        return last >= order.price_paise

    def _fill(self, order: Order, qty: int, price_paise: int, now: float) -> None:
        order.fills.append(Fill(f"{next(self._trade_seq):08d}", qty, price_paise, now))
        order.filled_quantity += qty
        order.filled_value += qty * price_paise
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
