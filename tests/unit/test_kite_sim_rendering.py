"""The simulator's cached order JSON is byte for byte a fresh rendering, at every step of an order's life."""

from __future__ import annotations

import tracemalloc

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


class FixedClock:
    def time(self) -> float:
        return 1764400000.25


# A MARKET BUY of 15 against a depth of 10 a level, as the simulator rendered it before its history
# rendering was rewritten for speed: the wire format (keys, their order, every value) must not move.
FIRST_ENTRY = (
    '{"placed_by":"SM0001","order_id":"251129000000001","exchange_order_id":null,"parent_order_id":null,"'
    'status":"PUT ORDER REQ RECEIVED","status_message":null,"status_message_raw":null,"order_timestamp":"'
    '2025-11-29 12:36:40","exchange_update_timestamp":null,"exchange_timestamp":null,"variety":"regular",'
    '"modified":false,"exchange":"NSE","tradingsymbol":"INFY","instrument_token":408065,"order_type":"MAR'
    'KET","transaction_type":"BUY","validity":"DAY","validity_ttl":0,"product":"MIS","quantity":15,"discl'
    'osed_quantity":0,"price":0.0,"trigger_price":0.0,"average_price":0.0,"filled_quantity":0,"pending_qu'
    'antity":15,"cancelled_quantity":0,"market_protection":-1,"meta":{},"tag":"tw1","tags":["tw1"],"guid"'
    ':"251129000000001"}'
)
LAST_ENTRY = (
    '{"placed_by":"SM0001","order_id":"251129000000001","exchange_order_id":"1251129000000001","parent_or'
    'der_id":null,"status":"COMPLETE","status_message":null,"status_message_raw":null,"order_timestamp":"'
    '2025-11-29 12:36:40","exchange_update_timestamp":"2025-11-29 12:36:40","exchange_timestamp":"2025-11'
    '-29 12:36:40","variety":"regular","modified":false,"exchange":"NSE","tradingsymbol":"INFY","instrume'
    'nt_token":408065,"order_type":"MARKET","transaction_type":"BUY","validity":"DAY","validity_ttl":0,"p'
    'roduct":"MIS","quantity":15,"disclosed_quantity":0,"price":0.0,"trigger_price":0.0,"average_price":1'
    '500.0133333333333,"filled_quantity":15,"pending_quantity":0,"cancelled_quantity":0,"market_protectio'
    'n":-1,"meta":{},"tag":"tw1","tags":["tw1"],"guid":"251129000000001"}'
)


def test_history_json_is_byte_for_byte_what_kite_clients_were_served() -> None:
    market = Market(load_instruments(DATA_FILE), seed=1)
    book = Book(market, depth_quantity=10, clock=FixedClock())
    book._day_prefix = "251129"  # the order id's date part, fixed for the literal
    account = book.create_account()
    order = book.new_order(account, market.by_symbol["INFY"], variety="regular", transaction_type="BUY", quantity=15,
                           product="MIS", order_type="MARKET", validity="DAY", price_paise=0, market_protection=-1,
                           tag="tw1")
    book.execute(order)
    body = RenderedOrders(book).history_body(order)
    entries = orjson.loads(body)["data"]
    assert [e["status"] for e in entries] == ["PUT ORDER REQ RECEIVED", "VALIDATION PENDING", "OPEN PENDING", "OPEN",
                                              "COMPLETE"]
    assert body.startswith(b'{"status":"success","data":[' + FIRST_ENTRY.encode() + b",")
    assert body.endswith(b"," + LAST_ENTRY.encode() + b"]}")
    assert orjson.dumps(order.as_kite()) == LAST_ENTRY.encode()


def test_cached_order_json_costs_its_own_size() -> None:
    # orjson's bytes keep the buffer they were written into (16 KB traced for a 0.7 KB order);
    # kept six to an order, they grew the simulator by ~45 KB an order.
    market = Market(load_instruments(DATA_FILE), seed=1)
    book = Book(market)
    rendered = RenderedOrders(book)
    account = book.create_account()
    ins = market.by_symbol["INFY"]
    orders = []
    for _ in range(200):
        order = book.new_order(account, ins, variety="regular", transaction_type="BUY", quantity=1, product="MIS",
                               order_type="MARKET", validity="DAY", price_paise=0, market_protection=-1, tag="t")
        book.execute(order)
        orders.append(order)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for order in orders:
            rendered.history_body(order)
            rendered.order(order)
        per_order = (tracemalloc.get_traced_memory()[0] - before) / len(orders)
    finally:
        tracemalloc.stop()
    history_bytes = len(rendered.history_body(orders[0]))
    assert per_order < 2 * history_bytes, per_order
