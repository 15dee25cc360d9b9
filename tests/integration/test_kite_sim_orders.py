"""The simulator's order API as a live-Kite user calls it: SL/SL-M, modify, cancel, partial fills,
Kite's validation errors, order updates over the WebSocket and postbacks. Official client only."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from kiteconnect import KiteConnect, KiteTicker
from kiteconnect.exceptions import GeneralException, InputException, OrderException
from twisted.internet import reactor

from libs.trading.calendar import IST
from tests.support.eventually import eventually_sync
from tests.support.kite_sim import SimAdmin, SimError, run_sim, ws_root

pytest_plugins = ["tests.integration.kite_sim_support"]

SLIPPAGE_BPS = 10
BEFORE_EXCHANGE = ["PUT ORDER REQ RECEIVED", "VALIDATION PENDING", "OPEN PENDING"]


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    # The walk is off so prices move only when a test says so.
    with run_sim(slippage_bps=SLIPPAGE_BPS, tick_interval_ms=0, seed=11) as url:
        yield url


def place(kite: KiteConnect, symbol: str, side: str, qty: int, order_type: str, **extra: Any) -> str:
    if order_type in ("MARKET", "SL-M"):
        extra.setdefault("market_protection", -1)
    return kite.place_order(variety="regular", exchange="NSE", tradingsymbol=symbol, transaction_type=side,
                            quantity=qty, product=extra.pop("product", "MIS"), order_type=order_type, **extra)


def statuses(kite: KiteConnect, order_id: str) -> list[str]:
    return [h["status"] for h in kite.order_history(order_id)]


def last_state(kite: KiteConnect, order_id: str) -> dict[str, Any]:
    return kite.order_history(order_id)[-1]


def vwap(trades: list[dict[str, Any]]) -> float:
    return sum(t["quantity"] * t["average_price"] for t in trades) / sum(t["quantity"] for t in trades)


def complete(kite: KiteConnect, order_id: str, timeout: float = 10) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        state = last_state(kite, order_id)
        return state if state["status"] == "COMPLETE" else None

    return eventually_sync(done, timeout=timeout, interval=0.05, message=f"{order_id} never completed")


# Kite's published samples (kiteconnect-mocks: orders.json, order_trades.json, postback.json).
ORDER_FIELDS = {
    "placed_by": str, "order_id": str, "exchange_order_id": (str, type(None)), "parent_order_id": type(None),
    "status": str, "status_message": (str, type(None)), "status_message_raw": (str, type(None)),
    "order_timestamp": str, "exchange_update_timestamp": (str, type(None)), "exchange_timestamp": (str, type(None)),
    "variety": str, "modified": bool, "exchange": str, "tradingsymbol": str, "instrument_token": int,
    "order_type": str, "transaction_type": str, "validity": str, "validity_ttl": int, "product": str,
    "quantity": int, "disclosed_quantity": int, "price": (int, float), "trigger_price": (int, float),
    "average_price": (int, float), "filled_quantity": int, "pending_quantity": int, "cancelled_quantity": int,
    "market_protection": int, "meta": dict, "tag": (str, type(None)), "tags": list, "guid": (str, type(None)),
}
TRADE_FIELDS = {
    "trade_id": str, "order_id": str, "exchange": str, "tradingsymbol": str, "instrument_token": int,
    "product": str, "average_price": (int, float), "quantity": int, "exchange_order_id": str,
    "transaction_type": str, "fill_timestamp": str, "order_timestamp": str, "exchange_timestamp": str,
}
POSTBACK_FIELDS = ORDER_FIELDS | {"user_id": str, "unfilled_quantity": int, "app_id": int, "checksum": str}


def assert_shape(row: dict[str, Any], fields: dict[str, Any]) -> None:
    assert set(fields) <= set(row), f"missing {set(fields) - set(row)}"
    wrong = {k: type(row[k]).__name__ for k, t in fields.items() if not isinstance(row[k], t)}
    assert not wrong, f"wrong types: {wrong}"


def test_orders_trades_and_history_have_kites_fields_and_types(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.ticks(("INFY", 1500.00))
    order_id = place(kite, "INFY", "BUY", 2, "MARKET", tag="TWSHAPE")
    # Raw JSON (the client's public methods parse timestamps into datetimes).
    for row in [*kite._get("orders"), *kite._get("order.info", url_args={"order_id": order_id})]:
        assert_shape(row, ORDER_FIELDS)
    for row in [*kite._get("trades"), *kite._get("order.trades", url_args={"order_id": order_id})]:
        assert_shape(row, TRADE_FIELDS)


# SL and SL-M -------------------------------------------------------------------------------------


def test_sl_m_sell_waits_for_its_trigger_then_fills_at_market(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.ticks(("INFY", 1500.00))
    order_id = place(kite, "INFY", "SELL", 10, "SL-M", trigger_price=1490.00)
    state = last_state(kite, order_id)
    assert statuses(kite, order_id) == [*BEFORE_EXCHANGE, "TRIGGER PENDING"]
    assert state["trigger_price"] == 1490.0 and state["price"] == 0 and state["pending_quantity"] == 10
    admin.ticks(("INFY", 1495.00))  # above the trigger: nothing happens
    assert last_state(kite, order_id)["status"] == "TRIGGER PENDING"

    admin.ticks(("INFY", 1489.00))
    state = complete(kite, order_id)
    assert statuses(kite, order_id)[-3:] == ["TRIGGER PENDING", "OPEN", "COMPLETE"]
    assert state["average_price"] == pytest.approx(1487.50)  # 1489 * (1 - 10 bps), on the tick size
    assert state["filled_quantity"] == 10 and state["pending_quantity"] == 0
    assert [t["quantity"] for t in kite.order_trades(order_id)] == [10]


def test_sl_buy_triggers_into_a_limit_that_fills_only_within_its_price(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.ticks(("TCS", 3850.00))
    order_id = place(kite, "TCS", "BUY", 5, "SL", trigger_price=3860.00, price=3862.00)
    admin.ticks(("TCS", 3870.00))  # triggered, but the market is above the limit
    state = last_state(kite, order_id)
    assert state["status"] == "OPEN" and state["filled_quantity"] == 0
    admin.ticks(("TCS", 3861.00))
    state = last_state(kite, order_id)
    assert state["status"] == "COMPLETE" and state["average_price"] == pytest.approx(3861.00)  # no slippage


@pytest.mark.parametrize(
    ("side", "extra", "error", "fragment"),
    [
        ("SELL", {"order_type": "SL-M"}, InputException, "trigger_price"),
        ("BUY", {"order_type": "SL", "trigger_price": 1510.0, "price": 1505.0}, InputException, "lower than"),
        ("SELL", {"order_type": "SL", "trigger_price": 1490.0, "price": 1495.0}, InputException, "higher than"),
        ("BUY", {"order_type": "SL-M", "trigger_price": 1495.0}, OrderException, "last traded price"),
        ("SELL", {"order_type": "SL-M", "trigger_price": 1505.0}, OrderException, "last traded price"),
        ("BUY", {"order_type": "LIMIT", "price": 1500.03}, InputException, "Tick size"),
        ("BUY", {"order_type": "SL-M", "trigger_price": 1510.02}, InputException, "Tick size"),
        ("BUY", {"order_type": "LIMIT", "price": 1900.0}, OrderException, "upper circuit limit of 1800.00"),
        ("SELL", {"order_type": "LIMIT", "price": 1100.0}, OrderException, "lower circuit limit of 1200.00"),
        ("BUY", {"order_type": "MARKET", "quantity": 100_001}, OrderException, "freeze"),
        ("BUY", {"order_type": "BRACKET"}, InputException, "order_type"),
    ],
)
def test_orders_kite_would_refuse_raise_and_stay_out_of_the_book(
        kite: KiteConnect, admin: SimAdmin, side: str, extra: dict[str, Any], error: type[Exception],
        fragment: str) -> None:
    admin.ticks(("INFY", 1500.00))
    qty = extra.pop("quantity", 1)
    with pytest.raises(error, match=fragment) as info:
        place(kite, "INFY", side, qty, extra.pop("order_type"), **extra)
    assert info.value.code == 400
    assert kite.orders() == []


@pytest.mark.parametrize(("ist_time", "mis_allowed"), [("11:00:00", True), ("15:25:00", False)])
def test_mis_orders_are_refused_after_the_cutoff_on_the_nse_calendar(ist_time: str, mis_allowed: bool) -> None:
    now = datetime.now(IST)
    target = datetime.combine(now.date(), datetime.strptime(ist_time, "%H:%M:%S").time(), IST)
    with run_sim(tick_interval_ms=0, market_calendar="nse", clock_offset_s=(target - now).total_seconds()) as url:
        acct = SimAdmin(url).create_account()
        kite = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=url, timeout=5)
        if mis_allowed:
            order_id = place(kite, "ITC", "BUY", 1, "MARKET")
            assert last_state(kite, order_id)["order_timestamp"].strftime("%H:%M") == ist_time[:5]
        else:
            with pytest.raises(OrderException, match="MIS orders are blocked after 15:20"):
                place(kite, "ITC", "BUY", 1, "MARKET")
        assert place(kite, "ITC", "BUY", 1, "MARKET", product="CNC")  # delivery is never cut off
        assert [o["product"] for o in kite.orders()] == (["MIS", "CNC"] if mis_allowed else ["CNC"])


# modify and cancel -------------------------------------------------------------------------------


def test_modify_a_resting_limit_then_turn_it_into_a_market_order(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.ticks(("SBIN", 800.00))
    order_id = place(kite, "SBIN", "BUY", 5, "LIMIT", price=790.00)
    assert kite.modify_order("regular", order_id, quantity=8, price=795.00) == order_id
    history = kite.order_history(order_id)
    assert [h["status"] for h in history] == [*BEFORE_EXCHANGE, "OPEN", "MODIFY VALIDATION PENDING",
                                              "MODIFY PENDING", "MODIFIED", "OPEN"]
    assert (history[3]["quantity"], history[3]["price"]) == (5, 790.0)  # the history keeps old values
    assert (history[-1]["quantity"], history[-1]["price"], history[-1]["modified"]) == (8, 795.0, True)

    kite.modify_order("regular", order_id, order_type="MARKET", market_protection=-1)
    state = last_state(kite, order_id)
    assert state["status"] == "COMPLETE" and state["order_type"] == "MARKET" and state["filled_quantity"] == 8
    assert state["average_price"] == pytest.approx(800.80)  # 800 * (1 + 10 bps)


def test_modify_a_trigger_pending_order_trigger_type_and_to_limit(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.ticks(("HDFCBANK", 1650.00))
    order_id = place(kite, "HDFCBANK", "SELL", 3, "SL-M", trigger_price=1600.00)
    kite.modify_order("regular", order_id, trigger_price=1620.00, order_type="SL", price=1615.00)
    state = last_state(kite, order_id)
    assert (state["status"], state["order_type"], state["trigger_price"], state["price"]) == (
        "TRIGGER PENDING", "SL", 1620.0, 1615.0)
    admin.ticks(("HDFCBANK", 1625.00))
    assert last_state(kite, order_id)["status"] == "TRIGGER PENDING"  # the old trigger would not fire either
    kite.modify_order("regular", order_id, order_type="LIMIT", price=1640.00)
    assert statuses(kite, order_id)[-2:] == ["MODIFIED", "OPEN"]
    admin.ticks(("HDFCBANK", 1641.00))
    assert last_state(kite, order_id)["average_price"] == pytest.approx(1641.00)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"price": 790.03}, "Tick size"),
        ({"order_type": "SL", "trigger_price": 795.0}, "cannot be changed"),
        ({"quantity": 0}, "uantity"),
        ({"price": 2000.0}, "upper circuit"),
    ],
)
def test_invalid_modifications_raise_and_leave_the_order_as_it_was(
        kite: KiteConnect, admin: SimAdmin, change: dict[str, Any], fragment: str) -> None:
    admin.ticks(("SBIN", 800.00))
    order_id = place(kite, "SBIN", "BUY", 5, "LIMIT", price=790.00)
    with pytest.raises((InputException, OrderException), match=fragment):
        kite.modify_order("regular", order_id, **change)
    assert statuses(kite, order_id) == [*BEFORE_EXCHANGE, "OPEN"]
    assert last_state(kite, order_id)["price"] == 790.0


def test_a_partly_filled_order_keeps_its_fills_through_modifications_up_to_kites_cap(
        kite: KiteConnect, admin: SimAdmin) -> None:
    admin.set_liquidity(depth_quantity=20)
    admin.ticks(("INFY", 1500.00))
    order_id = place(kite, "INFY", "BUY", 300, "LIMIT", price=1500.05)  # two ask levels within the limit
    filled = last_state(kite, order_id)["filled_quantity"]
    assert 0 < filled < 300
    with pytest.raises(InputException, match="filled quantity"):
        kite.modify_order("regular", order_id, quantity=filled)
    for n in range(25):
        kite.modify_order("regular", order_id, price=1490.00 - 0.05 * n)
    with pytest.raises(InputException, match="modifications"):
        kite.modify_order("regular", order_id, price=1480.00)
    state = last_state(kite, order_id)
    assert (state["filled_quantity"], state["pending_quantity"], state["price"]) == (filled, 300 - filled, 1488.8)


def test_done_and_unknown_orders_cannot_be_modified_or_cancelled(
        kite: KiteConnect, admin: SimAdmin, sim_url: str) -> None:
    admin.ticks(("ITC", 440.00))
    filled = place(kite, "ITC", "BUY", 2, "MARKET")
    with pytest.raises(InputException, match="COMPLETE"):
        kite.modify_order("regular", filled, quantity=4)
    with pytest.raises(InputException, match="COMPLETE"):
        kite.cancel_order("regular", filled)
    with pytest.raises(InputException, match="order_id"):
        kite.modify_order("regular", "999999999999999", quantity=4)
    other = admin.create_account()
    stranger = KiteConnect(other["api_key"], access_token=other["access_token"], root=sim_url)
    with pytest.raises(InputException, match="order_id"):
        stranger.modify_order("regular", filled, quantity=4)  # another account's order does not exist for it


def test_cancel_a_trigger_pending_order(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.ticks(("LT", 3500.00))
    order_id = place(kite, "LT", "SELL", 4, "SL-M", trigger_price=3400.00)
    assert kite.cancel_order("regular", order_id) == order_id
    state = last_state(kite, order_id)
    assert statuses(kite, order_id)[-3:] == ["TRIGGER PENDING", "CANCEL PENDING", "CANCELLED"]
    assert (state["cancelled_quantity"], state["filled_quantity"], state["pending_quantity"]) == (4, 0, 0)
    admin.ticks(("LT", 3300.00))  # a cancelled stop never fires
    assert kite.order_trades(order_id) == []


# partial fills -----------------------------------------------------------------------------------


def test_a_market_order_larger_than_the_depth_walks_it_and_completes(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.set_liquidity(depth_quantity=20)  # five levels of 10..30 shares
    admin.ticks(("RELIANCE", 2450.00))
    order_id = place(kite, "RELIANCE", "BUY", 400, "MARKET")
    state = complete(kite, order_id)
    trades = kite.order_trades(order_id)
    assert len(trades) > 5 and sum(t["quantity"] for t in trades) == 400
    assert len({t["trade_id"] for t in trades}) == len(trades)
    assert state["average_price"] == pytest.approx(vwap(trades), abs=1e-9)
    slipped = 2450 * (1 + SLIPPAGE_BPS / 10_000)
    assert min(t["average_price"] for t in trades) == pytest.approx(slipped)  # the best level, with slippage
    assert max(t["average_price"] for t in trades) > slipped  # deeper levels cost more
    progress = [h["filled_quantity"] for h in kite.order_history(order_id) if h["status"] in ("OPEN", "COMPLETE")]
    assert progress == sorted(progress) and 0 < progress[1] < 400 and progress[-1] == 400
    (position,) = kite.positions()["net"]
    assert position["quantity"] == 400 and position["buy_price"] == pytest.approx(vwap(trades), abs=1e-3)


def test_market_protection_cancels_what_the_depth_cannot_fill(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.set_liquidity(depth_quantity=1, cancel_unfilled_market=True)  # five levels of one share
    admin.ticks(("RELIANCE", 2450.00))
    order_id = place(kite, "RELIANCE", "BUY", 8, "MARKET")
    state = last_state(kite, order_id)
    assert (state["status"], state["filled_quantity"], state["cancelled_quantity"]) == ("CANCELLED", 5, 3)
    (position,) = kite.positions()["net"]
    assert position["quantity"] == 5


def test_a_limit_order_rests_partly_filled_and_fills_on_later_ticks(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.set_liquidity(depth_quantity=20)
    admin.ticks(("INFY", 1500.00))
    order_id = place(kite, "INFY", "SELL", 200, "LIMIT", price=1499.90)  # bids at 1500.00, 1499.95, 1499.90
    state = last_state(kite, order_id)
    first = kite.order_trades(order_id)
    assert state["status"] == "OPEN" and 0 < state["filled_quantity"] < 200
    assert state["pending_quantity"] == 200 - state["filled_quantity"]
    assert [t["average_price"] for t in first] == [1500.0, 1499.95, 1499.90]
    time.sleep(0.3)  # no new tick: a LIMIT order gets no refills, unlike a MARKET order
    assert last_state(kite, order_id)["filled_quantity"] == state["filled_quantity"]

    admin.ticks(("INFY", 1501.00))  # a fresh book: more fills, all at or above the limit
    later = last_state(kite, order_id)
    assert later["filled_quantity"] > state["filled_quantity"]
    assert kite.cancel_order("regular", order_id) == order_id
    final = last_state(kite, order_id)
    trades = kite.order_trades(order_id)
    assert final["status"] == "CANCELLED"
    assert final["cancelled_quantity"] == 200 - final["filled_quantity"] == 200 - sum(t["quantity"] for t in trades)
    assert final["average_price"] == pytest.approx(vwap(trades), abs=1e-9)
    assert min(t["average_price"] for t in trades) >= 1499.90


def test_an_ioc_limit_fills_what_it_can_and_cancels_the_rest(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.set_liquidity(depth_quantity=20)
    admin.ticks(("ITC", 440.00))
    order_id = place(kite, "ITC", "BUY", 500, "LIMIT", price=440.05, validity="IOC")
    state = last_state(kite, order_id)
    assert state["status"] == "CANCELLED" and 0 < state["filled_quantity"] < 500
    assert state["cancelled_quantity"] == 500 - state["filled_quantity"]


def test_the_depth_is_deterministic_for_a_seed(kite: KiteConnect, admin: SimAdmin, sim_url: str) -> None:
    def fills() -> list[tuple[int, float]]:
        admin.reset()
        admin.set_liquidity(depth_quantity=50)
        acct = admin.create_account()
        client = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=sim_url)
        order_id = place(client, "TCS", "BUY", 150, "LIMIT", price=3850.20)
        return [(t["quantity"], t["average_price"]) for t in client.order_trades(order_id)]

    first = fills()
    assert len({q for q, _ in first}) > 1  # levels differ in size
    assert fills() == first


# order updates and postbacks ---------------------------------------------------------------------


class OrderUpdateProbe:
    """A threaded KiteTicker that records order updates."""

    def __init__(self, base_url: str, api_key: str, access_token: str) -> None:
        self.kt = KiteTicker(api_key, access_token, root=ws_root(base_url))
        self.updates: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self.kt.on_order_update = lambda ws, data: self.updates.append(data)
        self.kt.on_connect = lambda ws, response: self.connected.set()

    def __enter__(self) -> OrderUpdateProbe:
        if reactor.running:
            reactor.callFromThread(self.kt.connect, threaded=True)
        else:
            self.kt.connect(threaded=True)
        assert self.connected.wait(10), "ticker did not connect"
        return self

    def __exit__(self, *exc: object) -> None:
        reactor.callFromThread(self.kt.close)


def test_order_updates_reach_the_accounts_ticker_only(
        sim_url: str, kite: KiteConnect, admin: SimAdmin, account: dict[str, Any]) -> None:
    other = admin.create_account()
    admin.ticks(("SBIN", 800.00))
    with OrderUpdateProbe(sim_url, account["api_key"], account["access_token"]) as mine, \
            OrderUpdateProbe(sim_url, other["api_key"], other["access_token"]) as theirs:
        order_id = place(kite, "SBIN", "BUY", 5, "LIMIT", price=790.00, tag="TWUPD1")
        kite.modify_order("regular", order_id, price=792.00)
        admin.ticks(("SBIN", 791.00))
        eventually_sync(lambda: [u["status"] for u in mine.updates] == ["OPEN", "UPDATE", "COMPLETE"],
                        timeout=10, message=f"updates: {[u['status'] for u in mine.updates]}")
    done = mine.updates[-1]
    assert_shape(done, POSTBACK_FIELDS)
    assert done["order_id"] == order_id and done["tag"] == "TWUPD1" and done["filled_quantity"] == 5
    assert done["average_price"] == 791.0 and done["price"] == 792.0 and done["unfilled_quantity"] == 0
    assert done["checksum"] == hashlib.sha256(
        (order_id + done["order_timestamp"] + account["api_secret"]).encode()).hexdigest()
    assert theirs.updates == []


class PostbackSink(http.server.ThreadingHTTPServer):
    """Collect postback bodies; optionally answer slowly."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.delay_s = delay_s
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(sink.delay_s)
                sink.bodies.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/kite/postback"


def test_postbacks_carry_kites_checksum_and_never_delay_orders(sim_url: str, admin: SimAdmin) -> None:
    sink = PostbackSink(delay_s=1.0)  # a slow endpoint
    try:
        acct = admin.create_account(postback_url=sink.url)
        kite = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=sim_url, timeout=5)
        admin.ticks(("INFY", 1500.00))
        started = time.monotonic()
        order_id = place(kite, "INFY", "BUY", 3, "MARKET", tag="TWPB1")
        assert time.monotonic() - started < 0.9, "placing waited for the postback"
        eventually_sync(lambda: {b["status"] for b in sink.bodies} >= {"OPEN", "COMPLETE"}, timeout=10)
    finally:
        sink.shutdown()
    (done,) = [b for b in sink.bodies if b["status"] == "COMPLETE"]
    assert_shape(done, POSTBACK_FIELDS)
    assert done["order_id"] == order_id and done["user_id"] == acct["user_id"] and done["tag"] == "TWPB1"
    assert done["filled_quantity"] == 3 and done["average_price"] == pytest.approx(1501.50)
    assert done["checksum"] == hashlib.sha256(
        (order_id + done["order_timestamp"] + acct["api_secret"]).encode()).hexdigest()


def test_admin_refuses_a_postback_url_that_is_not_http_and_bad_liquidity(admin: SimAdmin) -> None:
    with pytest.raises(SimError, match="postback_url"):
        admin.create_account(postback_url="ftp://example.com/x")
    for bad in ({"depth_quantity": 0}, {"slippage_bps": -1}, {"slippage_bps": "lots"}, {"spread": 1},
                {"cancel_unfilled_market": "yes"}):
        with pytest.raises(SimError, match="400"):
            admin.set_liquidity(**bad)
    assert admin.set_liquidity(slippage_bps=25) == {"slippage_bps": 25, "depth_quantity": 500,
                                                    "cancel_unfilled_market": False}


# every route answers Kite's envelope -------------------------------------------------------------


def test_unknown_routes_and_methods_answer_kites_json_envelope(kite: KiteConnect, sim_url: str) -> None:
    kite._routes["sim.nowhere"] = "/no/such/route"
    with pytest.raises(GeneralException, match="Route not found") as info:
        kite._get("sim.nowhere")
    assert info.value.code == 404
    with pytest.raises(GeneralException, match="not allowed") as info:
        kite._delete("user.profile")
    assert info.value.code == 405
    for method, path in (("PATCH", "/orders/regular/1"), ("POST", "/trades"), ("PUT", "/no/such")):
        resp = requests.request(method, sim_url + path, timeout=5)
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.json()["status"] == "error" and resp.json()["error_type"] == "GeneralException"
        assert resp.status_code in (404, 405)
