"""The simulator's cached order JSON is byte for byte a fresh rendering, at every step of an order's life."""

from __future__ import annotations

import orjson
import pytest

from services.kite_sim import rest
from services.kite_sim.book import Book, Modification
from services.kite_sim.market import DATA_FILE, Market, load_instruments
from services.kite_sim.orders import Order
from services.kite_sim.rest import RenderedOrders


def fresh(order: Order) -> tuple[bytes, bytes]:
    history = orjson.dumps({"status": "success", "data": [order.as_kite(e) for e in order.history]})
    return orjson.dumps(order.as_kite()), history


def assert_rendered(rendered: RenderedOrders, order: Order) -> None:
    current, history = fresh(order)
    for _ in range(2):  # the miss, then the hit
        assert rendered.order(order) == current
        assert rendered.history_body(order) == history
    rendered.current.clear()  # the order as it stands, taken from its encoded history
    assert rendered.order(order) == current


def test_cached_rendering_follows_fills_modifications_cancels_and_resets() -> None:
    market = Market(load_instruments(DATA_FILE), seed=1)
    book = Book(market, depth_quantity=10)
    rendered = RenderedOrders(book)
    account = book.create_account()
    ins = next(iter(market.by_token.values()))
    last = market.quote(ins).last
    order = book.new_order(account, ins, variety="regular", transaction_type="BUY", quantity=10_000, product="MIS",
                           order_type="LIMIT", validity="DAY", price_paise=last, market_protection=0, tag="t1")
    assert_rendered(rendered, order)
    book.execute(order)  # the depth fills part of it
    assert 0 < order.filled_quantity < order.quantity
    assert_rendered(rendered, order)
    book.modify(order, Modification(quantity=12_000, price_paise=last, trigger_paise=0, order_type="LIMIT",
                                    market_protection=0))
    assert order.modifications == 1
    assert_rendered(rendered, order)
    assert book.cancel(order)
    assert_rendered(rendered, order)

    book.reset()
    again = book.create_account()
    other = book.new_order(again, ins, variety="regular", transaction_type="SELL", quantity=1, product="MIS",
                           order_type="MARKET", validity="DAY", price_paise=0, market_protection=-1, tag=None)
    other.order_id = order.order_id  # a reused id must not serve the old order's JSON
    assert_rendered(rendered, other)


def test_rendered_orders_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rest, "RENDERED_ORDERS", 3)
    market = Market(load_instruments(DATA_FILE), seed=1)
    book = Book(market)
    rendered = RenderedOrders(book)
    account = book.create_account()
    ins = next(iter(market.by_token.values()))
    orders = []
    for i in range(6):
        order = book.new_order(account, ins, variety="regular", transaction_type="BUY", quantity=1, product="MIS",
                               order_type="MARKET", validity="DAY", price_paise=0, market_protection=-1, tag=f"t{i}")
        book.execute(order)
        orders.append(order)
        assert_rendered(rendered, order)
    assert len(rendered.current) <= 3 and len(rendered.histories) <= 3
    assert list(rendered.histories) == [o.order_id for o in orders[-3:]]
    for order in orders:  # evicted ones render again, the same
        assert_rendered(rendered, order)
