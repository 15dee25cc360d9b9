"""Place one order intent at the broker at most once, and confirm how it ended.

The tag is the idempotency key: when in doubt (an entry order, a retry, a
redelivered entry, any ambiguous failure) the day's order book is searched
for it first, and a live or filled order carrying it is confirmed instead of
placing another. Order history is polled until COMPLETE, REJECTED or
CANCELLED, through whatever statuses come before (PUT ORDER REQ RECEIVED,
VALIDATION PENDING, OPEN PENDING, OPEN while partial fills accumulate); a
fill that cannot be confirmed in time is an AMBIGUOUS error, so the retry
that follows looks the tag up again rather than placing twice. The price
recorded is the broker's average over the order's fills (several trades
when the order walked the depth), never a requested or last price, along
with the quantity actually filled.

Exits sell what is held, never the configured quantity: an entry or exit
may end CANCELLED/REJECTED after a partial fill. An exit that must look
first reads the run's entry and exit orders from one order book: a live exit
is confirmed (never placed beside); otherwise the remainder, the entry fills
minus the fills of every ended exit under the shared exit tag, is placed, if
any is left (see `services.executor` for why this sells each share once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from libs.broker.kite import TERMINAL, BrokerError, BrokerErrorKind, carries_tag, filled_quantity
from libs.broker.kite_rest import KiteOrderClient
from libs.schema.models import BrokerOrder
from libs.trading.tags import intent_of_tag
from services.executor import metrics
from services.executor.credentials import KiteCredentials
from services.executor.ratelimit import OrderRateLimiter, TakenSlot

COMPLETE, REJECTED, CANCELLED = "COMPLETE", "REJECTED", "CANCELLED"
DEAD = frozenset({REJECTED, CANCELLED})


@dataclass(frozen=True)
class OrderResult:
    """How an order ended at the broker."""

    order_id: str
    status: str
    average_price: float | None
    status_message: str | None
    found_by_tag: bool
    broker_order: dict[str, Any]
    filled_quantity: int = 0
    remaining: int | None = None  # an exit's: shares still held after it, per the broker's fills

    @property
    def filled(self) -> bool:
        return self.status == COMPLETE

    @property
    def partially_filled(self) -> bool:
        """Ended without completing, yet some of it traded (a position of filled_quantity is held)."""
        return self.status != COMPLETE and self.filled_quantity > 0

    def payload(self) -> dict[str, Any]:
        """Return the broker's reply as stored in order_logs (no credentials in it)."""
        order = self.broker_order
        return {"order_id": self.order_id, "status": self.status, "average_price": self.average_price,
                "status_message": self.status_message, "found_by_tag": self.found_by_tag,
                "quantity": order.get("quantity"), "filled_quantity": self.filled_quantity,
                "order_timestamp": str(order.get("order_timestamp") or "") or None}


@dataclass(frozen=True)
class ExitBook:
    """What one order book says about a run's exit."""

    entry_filled: int  # fills of every order under the entry tag
    exit_filled: int  # fills of every ended order under the exit tag
    live: dict[str, Any] | None  # an exit order still working, if any
    last_filled: dict[str, Any] | None  # the latest ended exit order that filled some
    known: frozenset[str]  # ids of the orders already under the exit tag

    def held(self, hint: int) -> int:
        """Return the shares held before any live exit fills (`hint`, runtime's, if the book shows no entry fill)."""
        return max(0, (self.entry_filled or hint) - self.exit_filled)


def result_of(order_id: str, order: dict[str, Any], *, found_by_tag: bool) -> OrderResult:
    """Build the result from the broker's final order state: its fill average and filled quantity."""
    filled = int(order.get("filled_quantity") or 0)
    price = order.get("average_price")
    # Kite reports 0 as the average of an order with no fills: that is no price at all.
    average = float(price) if price and filled else None
    return OrderResult(order_id=order_id, status=str(order.get("status") or ""), average_price=average,
                       status_message=order.get("status_message"), found_by_tag=found_by_tag,
                       broker_order=order, filled_quantity=filled)


class OrderPlacer:
    """Tag lookup, rate-limited placement and fill confirmation against one broker client."""

    def __init__(self, broker: KiteOrderClient, limiter: OrderRateLimiter, *, fill_timeout_s: float,
                 fill_poll_s: float) -> None:
        self.broker, self.limiter = broker, limiter
        self.fill_timeout_s, self.fill_poll_s = fill_timeout_s, fill_poll_s

    async def find_by_tag(self, creds: KiteCredentials, tag: str, *, accept_dead: bool) -> dict[str, Any] | None:
        """Return the order carrying `tag` that counts, or None.

        A live or filled order always counts, and so does a cancelled one that
        partly filled (placing the full quantity again would trade too much).
        A rejected or cancelled one with no fills only if `accept_dead` (an
        entry: its rejection is the answer); such an exit may be placed again
        under the same tag.
        """
        metrics.BOOK_READS.labels(intent=intent_of_tag(tag)).inc()
        tagged = [o for o in await self.broker.orders(creds.api_key, creds.access_token) if carries_tag(o, tag)]
        live = [o for o in tagged if o.get("status") not in DEAD or int(o.get("filled_quantity") or 0) > 0]
        if live:
            return live[-1]
        return tagged[-1] if tagged and accept_dead else None

    async def exit_book(self, creds: KiteCredentials, entry_tag: str, exit_tag: str) -> ExitBook:
        """Read the run's entry and exit orders from one order book."""
        metrics.BOOK_READS.labels(intent="exit").inc()
        book = await self.broker.orders(creds.api_key, creds.access_token)
        exits = [o for o in book if carries_tag(o, exit_tag)]
        ended = [o for o in exits if o.get("status") in TERMINAL]
        live = [o for o in exits if o.get("status") not in TERMINAL]
        filled = [o for o in ended if filled_quantity(o) > 0]
        return ExitBook(entry_filled=sum(filled_quantity(o) for o in book if carries_tag(o, entry_tag)),
                        exit_filled=sum(filled_quantity(o) for o in ended), live=live[-1] if live else None,
                        last_filled=filled[-1] if filled else None,
                        known=frozenset(str(o["order_id"]) for o in exits))

    async def execute_exit(self, creds: KiteCredentials, order: BrokerOrder, *, entry_tag: str,
                           lookup_first: bool, mark: tuple[str, int] | None = None, slot: TakenSlot | None = None,
                           guard: Callable[[], None] | None = None) -> OrderResult:
        """Sell what is held (`order.quantity` is runtime's count) and return the result with `remaining`.

        With `lookup_first` the book decides: a live exit is confirmed; else the
        remainder is placed, or, if nothing is left, the last filled exit is the result.
        """
        started = time.perf_counter()
        held, known = order.quantity, frozenset[str]()
        if lookup_first:
            book = await self.exit_book(creds, entry_tag, order.tag)
            held, known = book.held(order.quantity), book.known
            if book.live is not None:
                result = await self.confirm(creds, str(book.live["order_id"]), found_by_tag=True)
                return replace(result, remaining=max(0, held - result.filled_quantity))
            if held == 0:
                if book.last_filled is None:
                    raise BrokerError(BrokerErrorKind.FINAL, "nothing held to sell per the broker's fills")
                result = result_of(str(book.last_filled["order_id"]), book.last_filled, found_by_tag=True)
                return replace(result, remaining=0)
            order = order.model_copy(update={"quantity": held})
        order_id, found = await self._send(creds, order, mark=mark, slot=None if lookup_first else slot,
                                           guard=guard, known=known)
        result = await self.confirm(creds, order_id, found_by_tag=found)
        metrics.ORDER_LATENCY.observe(time.perf_counter() - started)
        return replace(result, remaining=max(0, held - result.filled_quantity))

    async def _send(self, creds: KiteCredentials, order: BrokerOrder, *, mark: tuple[str, int] | None,
                    slot: TakenSlot | None, guard: Callable[[], None] | None, accept_dead: bool = False,
                    known: frozenset[str] | None = None) -> tuple[str, bool]:
        """Place the order; after an ambiguous failure find it by tag. Return (order id, found by tag).

        `known`: ids already under the tag before sending (an exit's earlier legs),
        which the search after a failure must not mistake for this order. `slot`: one
        taken with the lock (and the mark set with it), used if still fresh, else
        given back for a new one.
        """
        if slot is not None and self.limiter.fresh(slot):
            metrics.RATE_WAIT.observe(0.0)
        else:
            await self.limiter.acquire(creds.api_key_fp, mark=mark, replace=slot)
        if guard is not None:
            guard()
        try:
            return await self.broker.place_market_order(
                creds.api_key, creds.access_token, symbol=order.symbol, exchange=order.exchange,
                transaction_type=order.transaction_type.value, quantity=order.quantity,
                product=order.product, tag=order.tag), False
        except BrokerError as error:
            if error.kind not in (BrokerErrorKind.RETRYABLE, BrokerErrorKind.AMBIGUOUS):
                raise
            # The order may be in the book although we never heard back.
            if known is None:
                existing = await self.find_by_tag(creds, order.tag, accept_dead=accept_dead)
            else:
                fresh = [o for o in await self.broker.orders(creds.api_key, creds.access_token)
                         if carries_tag(o, order.tag) and str(o["order_id"]) not in known]
                existing = fresh[-1] if fresh else None
            if existing is None:
                raise
            return str(existing["order_id"]), True

    async def execute(self, creds: KiteCredentials, order: BrokerOrder, *, lookup_first: bool,
                      accept_dead: bool, mark: tuple[str, int] | None = None, slot: TakenSlot | None = None,
                      guard: Callable[[], None] | None = None) -> OrderResult:
        """Return the confirmed result of the order intent, placing it only if the book lacks it.

        `mark` = (key, ttl_s) is SET right before the order is sent (with its rate-limit slot).
        `slot`: one taken with the lock, used if still fresh (else given back for a new one).
        `guard` is called right before the order is sent and raises to stop it (lock lost).
        """
        started = time.perf_counter()
        existing = await self.find_by_tag(creds, order.tag, accept_dead=accept_dead) if lookup_first else None
        if existing is not None:
            order_id, found = str(existing["order_id"]), True
        else:
            order_id, found = await self._send(creds, order, mark=mark, slot=slot, guard=guard,
                                               accept_dead=accept_dead)
        result = await self.confirm(creds, order_id, found_by_tag=found)
        metrics.ORDER_LATENCY.observe(time.perf_counter() - started)
        return result

    async def cancel(self, creds: KiteCredentials, order: dict[str, Any]) -> OrderResult:
        """Cancel a live order and return how it ended (it may have filled before the cancel)."""
        order_id = str(order["order_id"])
        try:
            await self.broker.cancel_order(creds.api_key, creds.access_token, order_id,
                                            str(order.get("variety") or "regular"))
        except BrokerError as error:
            if error.kind == BrokerErrorKind.RETRYABLE:
                raise  # nothing reached the broker: try again later
            # Refused (it filled or ended meanwhile) or unknown: its history says which.
        return await self.confirm(creds, order_id, found_by_tag=True)

    async def confirm(self, creds: KiteCredentials, order_id: str, *, found_by_tag: bool) -> OrderResult:
        """Poll order history until the order is COMPLETE, REJECTED or CANCELLED."""
        deadline = time.monotonic() + self.fill_timeout_s
        while True:
            history = await self.broker.order_history(creds.api_key, creds.access_token, order_id)
            last = history[-1] if history else {}
            status = str(last.get("status") or "")
            if status in TERMINAL:
                return result_of(order_id, last, found_by_tag=found_by_tag)
            if time.monotonic() >= deadline:
                raise BrokerError(BrokerErrorKind.AMBIGUOUS,
                                  f"order {order_id} not confirmed within {self.fill_timeout_s}s (status {status})")
            await asyncio.sleep(self.fill_poll_s)
