"""Kite's checks on an order request: form fields first, then its RMS rules.

Form errors (unknown order type, price off the tick size, a stoploss trigger
on the wrong side of its price) are InputExceptions; RMS rules (circuit
limits, the 1,00,000-share freeze quantity, MIS after the 15:20 IST cutoff,
a trigger already crossed by the last price) are OrderExceptions. Neither
puts the order in the book, as Kite's pre-exchange validation does not.
The MIS cutoff follows the simulator's calendar: `always_open` (the default,
for paper trading at any hour) never applies it, `nse` does, on the
simulator's clock.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from libs.trading.calendar import IST, MIS_SQUARE_OFF, CalendarMode
from services.kite_sim.book import Book, Modification
from services.kite_sim.depth import price_band
from services.kite_sim.market import Instrument, Market
from services.kite_sim.orders import LIVE, MARKET_TYPES, TRIGGER_PENDING, TRIGGER_TYPES, Order

VARIETIES = {"regular", "amo"}
PRODUCTS = {"CNC", "MIS", "NRML"}
ORDER_TYPES = {"MARKET", "LIMIT", "SL", "SL-M"}
PRICED_TYPES = frozenset({"LIMIT", "SL"})
VALIDITIES = {"DAY", "IOC"}
MAX_TAG_LENGTH = 20
FREEZE_QUANTITY = 100_000  # Kite blocks equity orders above 1,00,000 shares
MAX_MODIFICATIONS = 25  # Kite's cap on modifications of one order


class RuleViolation(Exception):
    """An order request Kite would refuse; `error_type` names the client's exception class."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def input_violation(message: str) -> RuleViolation:
    return RuleViolation("InputException", message)


def order_violation(message: str) -> RuleViolation:
    return RuleViolation("OrderException", message)


def _paise(form: Any, name: str) -> int:
    try:
        paise = round(float(str(form.get(name, ""))) * 100)
    except ValueError:
        raise input_violation(f"Invalid `{name}`.") from None
    if paise <= 0:
        raise input_violation(f"Invalid `{name}`.")
    return paise


def _market_protection(form: Any) -> float:
    try:
        protection = float(str(form.get("market_protection")))
    except ValueError:
        raise input_violation("`market_protection` is required for MARKET and SL-M orders (-1 or 0-100).") from None
    if not (protection == -1 or 0 < protection <= 100):
        raise input_violation("Invalid `market_protection`: use -1 (auto) or a percentage in (0, 100].")
    return protection


class OrderRules:
    """Validate order placements and modifications against the market, the book's clock and the calendar."""

    def __init__(self, market: Market, book: Book, calendar: CalendarMode = "always_open",
                 band_pct: float = 20.0) -> None:
        self.market = market
        self.book = book
        self.always_open = calendar == "always_open"
        self.band_pct = band_pct

    def placement(self, variety: str, form: Any) -> dict[str, Any]:
        """Check a place-order form; return the book's new_order kwargs."""
        if variety not in VARIETIES:
            raise input_violation(f"Invalid or unsupported `variety`: {variety}.")
        exchange = str(form.get("exchange", ""))
        symbol = str(form.get("tradingsymbol", ""))
        ins = self.market.by_symbol.get(symbol)
        if exchange != "NSE" or ins is None:
            raise input_violation(f"Invalid `tradingsymbol` or `exchange`: {exchange}:{symbol}.")
        transaction_type = str(form.get("transaction_type", ""))
        if transaction_type not in ("BUY", "SELL"):
            raise input_violation("Invalid `transaction_type`.")
        product = str(form.get("product", ""))
        if product not in PRODUCTS:
            raise input_violation("Invalid `product`.")
        order_type = str(form.get("order_type", ""))
        if order_type not in ORDER_TYPES:
            raise input_violation(f"Invalid or unsupported `order_type`: {order_type}.")
        validity = str(form.get("validity", "DAY"))
        if validity not in VALIDITIES:
            raise input_violation("Invalid `validity`.")
        quantity = self._quantity(form, ins)
        tag = form.get("tag")
        tag = str(tag) if tag is not None and str(tag) != "" else None
        if tag is not None and (len(tag) > MAX_TAG_LENGTH or not tag.replace("_", "").isalnum()):
            raise input_violation("Invalid `tag`: at most 20 alphanumeric characters.")
        price, trigger = self._prices(form, ins, order_type, transaction_type)
        protection = _market_protection(form) if order_type in MARKET_TYPES else 0.0
        self._rms(ins, transaction_type, quantity, price, trigger)
        if product == "MIS":
            self._mis_cutoff()
        return {"ins": ins, "variety": variety, "transaction_type": transaction_type, "quantity": quantity,
                "product": product, "order_type": order_type, "validity": validity, "price_paise": price,
                "trigger_paise": trigger, "market_protection": protection, "tag": tag}

    def modification(self, order: Order, form: Any) -> Modification:
        """Check a modify-order form against a live order; return the new values."""
        if order.status not in LIVE:
            raise input_violation(f"Order cannot be modified as it is {order.status}.")
        if order.modifications >= MAX_MODIFICATIONS:
            raise input_violation(f"Maximum allowed order modifications ({MAX_MODIFICATIONS}) exceeded.")
        order_type = str(form.get("order_type") or order.order_type)
        if order_type not in ORDER_TYPES:
            raise input_violation(f"Invalid or unsupported `order_type`: {order_type}.")
        if order_type in TRIGGER_TYPES and order.status != TRIGGER_PENDING:
            raise input_violation(f"Order type cannot be changed from {order.order_type} to {order_type}.")
        ins = order.instrument
        quantity = self._quantity(form, ins) if form.get("quantity") else order.quantity
        if quantity <= order.filled_quantity:
            raise input_violation(f"Quantity should be more than the filled quantity ({order.filled_quantity}).")
        values = {"price": order.price_paise / 100, "trigger_price": order.trigger_paise / 100}
        merged = {k: form.get(k) or v for k, v in values.items()}
        price, trigger = self._prices(merged, ins, order_type, order.transaction_type)
        protection = order.market_protection
        if order_type in MARKET_TYPES and (form.get("market_protection") or not protection):
            protection = _market_protection(form)
        self._rms(ins, order.transaction_type, quantity, price, trigger)
        return Modification(quantity=quantity, price_paise=price, trigger_paise=trigger, order_type=order_type,
                            market_protection=protection)

    @staticmethod
    def _quantity(form: Any, ins: Instrument) -> int:
        try:
            quantity = int(str(form.get("quantity", "")))
        except ValueError:
            raise input_violation("Invalid `quantity`.") from None
        if quantity <= 0 or quantity % ins.lot_size:
            raise input_violation(f"Quantity should be a positive multiple of lot size {ins.lot_size}.")
        return quantity

    @staticmethod
    def _prices(form: Any, ins: Instrument, order_type: str, side: str) -> tuple[int, int]:
        """Return (price, trigger) in paise for the order type, checked against the tick size."""
        price = _paise(form, "price") if order_type in PRICED_TYPES else 0
        trigger = _paise(form, "trigger_price") if order_type in TRIGGER_TYPES else 0
        tick = ins.tick_paise
        if price % tick or trigger % tick:
            raise input_violation(f"Tick size for this script is {tick / 100:.2f}. "
                                  f"Price and trigger price should be multiples of it.")
        if order_type == "SL" and side == "BUY" and trigger > price:
            raise input_violation("Trigger price for stoploss buy orders should be lower than or equal to "
                                  "the price.")
        if order_type == "SL" and side == "SELL" and trigger < price:
            raise input_violation("Trigger price for stoploss sell orders should be higher than or equal to "
                                  "the price.")
        return price, trigger

    def _rms(self, ins: Instrument, side: str, quantity: int, price: int, trigger: int) -> None:
        """Apply the risk rules: freeze quantity, circuit limits, trigger against the last price."""
        if quantity > FREEZE_QUANTITY:
            raise order_violation(f"Order quantity exceeds the freeze limit of {FREEZE_QUANTITY} shares for "
                                  f"this instrument. Place a smaller order.")
        if not (price or trigger):
            return  # a MARKET order: no price to check
        quote = self.market.quote(ins)
        lower, upper = price_band(quote, self.band_pct)
        for paise in (price, trigger):
            if paise and paise < lower:
                raise order_violation(f"Your order price is lower than the current lower circuit limit of "
                                      f"{lower / 100:.2f}. Place an order within the daily range.")
            if paise and paise > upper:
                raise order_violation(f"Your order price is higher than the current upper circuit limit of "
                                      f"{upper / 100:.2f}. Place an order within the daily range.")
        if trigger and side == "BUY" and trigger <= quote.last:
            raise order_violation("Trigger price for stoploss buy orders should be higher than the last traded "
                                  f"price ({quote.last / 100:.2f}).")
        if trigger and side == "SELL" and trigger >= quote.last:
            raise order_violation("Trigger price for stoploss sell orders should be lower than the last traded "
                                  f"price ({quote.last / 100:.2f}).")

    def _mis_cutoff(self) -> None:
        if self.always_open:
            return
        local = datetime.fromtimestamp(self.book.now(), IST).time()
        if local >= MIS_SQUARE_OFF:
            raise order_violation(f"MIS orders are blocked after {MIS_SQUARE_OFF.strftime('%H:%M')} IST, when "
                                  "intraday positions are squared off. Place a CNC order instead.")
