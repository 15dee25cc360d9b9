"""The Kite simulator's REST surface, driven only through the official kiteconnect client."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from kiteconnect import KiteConnect
from kiteconnect.exceptions import GeneralException, InputException, NetworkException, TokenException

from tests.support.kite_sim import SimAdmin, run_sim

pytest_plugins = ["tests.integration.kite_sim_support"]

SLIPPAGE_BPS = 10


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    # The walk is off so prices move only when a test says so.
    with run_sim(slippage_bps=SLIPPAGE_BPS, tick_interval_ms=0, seed=7) as url:
        yield url


def market_order(kite: KiteConnect, symbol: str, side: str, qty: int = 1, **extra: Any) -> str:
    params: dict[str, Any] = {"market_protection": -1} | extra
    return kite.place_order(variety=kite.VARIETY_REGULAR, exchange="NSE", tradingsymbol=symbol,
                            transaction_type=side, quantity=qty, product=kite.PRODUCT_MIS,
                            order_type=kite.ORDER_TYPE_MARKET, **params)


def test_profile_returns_the_account_user(kite: KiteConnect, account: dict[str, Any]) -> None:
    profile = kite.profile()
    assert profile["user_id"] == account["user_id"]
    assert profile["user_name"] == "Asha Rao"
    assert "NSE" in profile["exchanges"]


def test_generate_session_accepts_good_checksum_once_and_rejects_bad(
        sim_url: str, admin: SimAdmin, account: dict[str, Any]) -> None:
    client = KiteConnect(account["api_key"], root=sim_url, timeout=5)
    with pytest.raises(TokenException):
        client.generate_session(admin.request_token(account["api_key"]), api_secret="not-the-secret")
    request_token = admin.request_token(account["api_key"])
    session = client.generate_session(request_token, api_secret=account["api_secret"])
    assert session["access_token"] != account["access_token"]
    assert session["user_id"] == account["user_id"]
    assert client.profile()["user_id"] == account["user_id"]  # client now carries the new token
    with pytest.raises(TokenException):
        client.generate_session(request_token, api_secret=account["api_secret"])  # one-time token
    old = KiteConnect(account["api_key"], access_token=account["access_token"], root=sim_url)
    with pytest.raises(TokenException):
        old.profile()


def test_instruments_dump_parses_with_stable_nse_tokens(kite: KiteConnect) -> None:
    first = kite.instruments("NSE")
    by_symbol = {row["tradingsymbol"]: row for row in first}
    assert len(first) >= 200
    for symbol in ("RELIANCE", "INFY", "TCS", "HDFCBANK", "SBIN", "M&M", "BAJAJ-AUTO"):
        assert symbol in by_symbol
    assert by_symbol["INFY"]["instrument_token"] == 408065
    assert all(row["instrument_token"] & 0xFF == 1 for row in first)  # NSE segment byte
    assert all(row["exchange"] == "NSE" and row["instrument_type"] == "EQ" for row in first)
    assert kite.instruments() == first


def test_market_orders_fill_at_pushed_price_with_slippage(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.ticks(("INFY", 1500.00))
    buy_id = market_order(kite, "INFY", "BUY", 10, tag="TWEBUY1")
    admin.ticks(("INFY", 1600.00))
    sell_id = market_order(kite, "INFY", "SELL", 10)

    buy = kite.order_history(buy_id)
    assert [h["status"] for h in buy] == [
        "PUT ORDER REQ RECEIVED", "VALIDATION PENDING", "OPEN PENDING", "OPEN", "COMPLETE"]
    assert buy[-1]["average_price"] == pytest.approx(1501.50)  # 1500 * (1 + 10bps)
    assert buy[-1]["filled_quantity"] == 10 and buy[-1]["pending_quantity"] == 0
    sell = kite.order_history(sell_id)
    assert sell[-1]["average_price"] == pytest.approx(1598.40)  # 1600 * (1 - 10bps)

    trades = kite.order_trades(buy_id)
    assert [(t["quantity"], t["average_price"]) for t in trades] == [(10, pytest.approx(1501.50))]
    orders = {o["order_id"]: o for o in kite.orders()}
    assert set(orders) == {buy_id, sell_id}
    assert orders[buy_id]["tag"] == "TWEBUY1" and orders[buy_id]["tags"] == ["TWEBUY1"]
    assert orders[buy_id]["status"] == "COMPLETE"

    (net,) = kite.positions()["net"]
    assert net["tradingsymbol"] == "INFY" and net["quantity"] == 0
    assert net["pnl"] == pytest.approx((1598.40 - 1501.50) * 10)
    assert kite.ltp("NSE:INFY", "NSE:NOPE") == {"NSE:INFY": {"instrument_token": 408065, "last_price": 1600.0}}


def test_limit_order_rests_until_price_crosses_and_can_be_cancelled(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.ticks(("SBIN", 800.00))
    args = dict(variety="regular", exchange="NSE", tradingsymbol="SBIN", transaction_type="BUY", quantity=5,
                product="MIS", order_type="LIMIT")
    resting = kite.place_order(price=790.00, **args)
    to_cancel = kite.place_order(price=700.00, **args)
    assert kite.order_history(resting)[-1]["status"] == "OPEN"
    admin.ticks(("SBIN", 789.50))
    history = kite.order_history(resting)
    assert [h["status"] for h in history][-2:] == ["OPEN", "COMPLETE"]
    assert history[-1]["average_price"] == pytest.approx(789.50)

    assert kite.cancel_order("regular", to_cancel) == to_cancel
    assert kite.order_history(to_cancel)[-1]["status"] == "CANCELLED"
    with pytest.raises(InputException):
        kite.cancel_order("regular", resting)  # already complete


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"tag": "T" * 21}, "tag"),
        ({"market_protection": None}, "market_protection"),
        ({"tradingsymbol": "NOSUCHSTOCK"}, "tradingsymbol"),
        ({"quantity": 0}, "uantity"),
    ],
)
def test_invalid_orders_raise_input_exception(kite: KiteConnect, overrides: dict[str, Any], fragment: str) -> None:
    params: dict[str, Any] = dict(variety="regular", exchange="NSE", tradingsymbol="TCS", transaction_type="BUY",
                                  quantity=1, product="MIS", order_type="MARKET", market_protection=-1)
    params.update(overrides)
    with pytest.raises(InputException, match=fragment) as info:
        kite.place_order(**params)
    assert info.value.code == 400
    assert kite.orders() == []


def test_eleventh_order_within_a_second_gets_429(kite: KiteConnect) -> None:
    started = time.monotonic()
    for _ in range(10):
        market_order(kite, "ITC", "BUY")
    with pytest.raises(NetworkException) as info:
        market_order(kite, "ITC", "BUY")
    assert time.monotonic() - started < 1.0, "too slow to prove the per-second limit"
    assert info.value.code == 429


def test_daily_order_cap_counts_rejected_orders(sim_url: str, admin: SimAdmin) -> None:
    acct = admin.create_account(daily_order_cap=3)
    kite = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=sim_url)
    market_order(kite, "ITC", "BUY")
    with pytest.raises(InputException):
        market_order(kite, "ITC", "BUY", tag="X" * 25)
    market_order(kite, "ITC", "BUY")
    with pytest.raises(InputException, match="exceeded"):
        market_order(kite, "ITC", "BUY")


def test_expired_token_raises_token_exception(kite: KiteConnect, admin: SimAdmin, account: dict[str, Any]) -> None:
    assert kite.profile()
    admin.expire(account["api_key"])
    with pytest.raises(TokenException) as info:
        kite.orders()
    assert info.value.code == 403
    wrong = KiteConnect(account["api_key"], access_token="0" * 32, root=kite.root)
    with pytest.raises(TokenException):
        wrong.profile()


def test_latency_fault_delays_responses(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.set_faults(latency_ms=300)
    started = time.monotonic()
    kite.profile()
    assert time.monotonic() - started >= 0.3


def test_error_rate_fault_raises_general_exception_without_placing(
        kite: KiteConnect, admin: SimAdmin, account: dict[str, Any]) -> None:
    admin.set_faults(error_rate=1.0, routes=["orders"])
    with pytest.raises(GeneralException) as info:
        market_order(kite, "TCS", "BUY")
    assert info.value.code == 500
    assert kite.profile()  # other routes are untouched
    assert admin.orders(api_key=account["api_key"]) == []


def test_timeout_after_accept_places_the_order_but_never_answers(
        sim_url: str, admin: SimAdmin, account: dict[str, Any]) -> None:
    impatient = KiteConnect(account["api_key"], access_token=account["access_token"], root=sim_url, timeout=0.5)
    admin.set_faults(timeout_after_accept_rate=1.0)
    with pytest.raises(requests.exceptions.Timeout):
        market_order(impatient, "HDFCBANK", "BUY", tag="TWXAMBIGUOUS1")
    (seen,) = admin.orders(tag="TWXAMBIGUOUS1")
    assert seen["api_key"] == account["api_key"] and seen["status"] == "COMPLETE"
    assert seen["tradingsymbol"] == "HDFCBANK" and seen["transaction_type"] == "BUY"
    admin.set_faults()
    # Reconciling by tag through the client finds the order.
    assert [o["tag"] for o in impatient.orders()] == ["TWXAMBIGUOUS1"]


def test_reject_fault_shows_rejected_in_history(kite: KiteConnect, admin: SimAdmin) -> None:
    admin.set_faults(reject_rate=1.0)
    order_id = market_order(kite, "SBIN", "SELL", 3)
    history = kite.order_history(order_id)
    assert [h["status"] for h in history] == ["PUT ORDER REQ RECEIVED", "VALIDATION PENDING", "REJECTED"]
    entry = history[-1]
    assert entry["status"] == "REJECTED" and entry["status_message"] and entry["exchange_order_id"] is None
    assert entry["filled_quantity"] == 0
    assert kite.order_trades(order_id) == []
    assert kite.positions()["net"] == []


@pytest.mark.parametrize(("fault", "error", "code"), [("burst_429", NetworkException, 429),
                                                      ("burst_500", GeneralException, 500)])
def test_a_burst_answers_exactly_the_next_n_requests_with_its_error(kite: KiteConnect, admin: SimAdmin, fault: str,
                                                                    error: type[Exception], code: int) -> None:
    admin.set_faults(**{fault: 2, "routes": ["user"]})
    assert kite.ltp(["NSE:INFY"])  # another route group: untouched, and the burst not spent
    for _ in range(2):
        with pytest.raises(error) as info:
            kite.profile()
        assert info.value.code == code
    assert kite.profile()
    assert admin.faults()[fault] == 0


def test_admin_orders_filter_by_api_key_and_tag(sim_url: str, admin: SimAdmin, kite: KiteConnect,
                                                account: dict[str, Any]) -> None:
    other = admin.create_account()
    other_kite = KiteConnect(other["api_key"], access_token=other["access_token"], root=sim_url)
    mine = market_order(kite, "LT", "BUY", tag="TWEA")
    market_order(other_kite, "LT", "BUY", tag="TWEA")
    assert len(admin.orders(tag="TWEA")) == 2
    (row,) = admin.orders(api_key=account["api_key"])
    assert row["order_id"] == mine and row["received_at"] <= time.time()
    with pytest.raises(InputException):
        other_kite.order_history(mine)  # orders are private to their account


def test_unknown_route_and_checksum_formula_match_kite(sim_url: str, admin: SimAdmin,
                                                       account: dict[str, Any]) -> None:
    # The checksum the client sends is sha256(api_key + request_token + api_secret).
    request_token = admin.request_token(account["api_key"])
    checksum = hashlib.sha256((account["api_key"] + request_token + account["api_secret"]).encode()).hexdigest()
    resp = requests.post(sim_url + "/session/token", timeout=5,
                         data={"api_key": account["api_key"], "request_token": request_token, "checksum": checksum})
    assert resp.status_code == 200 and resp.json()["status"] == "success"
    missing = requests.get(sim_url + "/no/such/route", timeout=5)
    assert missing.status_code == 404 and missing.json()["error_type"] == "GeneralException"


def test_faults_set_and_cleared_through_the_admin_reach_the_order_routes(
        kite: KiteConnect, admin: SimAdmin, account: dict[str, Any]) -> None:
    # The order routes skip the per-request fault checks while no fault is set: setting one
    # (and clearing it) through /sim/faults must still reach place and history at once.
    order_id = market_order(kite, "INFY", "BUY")
    admin.set_faults(latency_ms=150, routes=["orders"])
    started = time.monotonic()
    kite.order_history(order_id)
    market_order(kite, "INFY", "BUY")
    assert time.monotonic() - started >= 0.3
    admin.set_faults(burst_500=1, routes=["orders"])
    with pytest.raises(GeneralException) as info:
        kite.order_history(order_id)
    assert info.value.code == 500
    assert kite.order_history(order_id)[-1]["status"] == "COMPLETE"
    admin.set_faults(burst_429=1, routes=["orders"])
    with pytest.raises(NetworkException) as info:
        market_order(kite, "TCS", "BUY")
    assert info.value.code == 429
    assert [o["tradingsymbol"] for o in admin.orders(api_key=account["api_key"])] == ["INFY", "INFY"]
    admin.set_faults(error_rate=1.0, routes=["orders"])
    with pytest.raises(GeneralException):
        market_order(kite, "TCS", "BUY")
    admin.set_faults()
    market_order(kite, "TCS", "BUY")
    assert len(admin.orders(api_key=account["api_key"])) == 3


def test_order_routes_answer_errors_in_kites_envelope_with_kites_status(
        sim_url: str, kite: KiteConnect, account: dict[str, Any]) -> None:
    def error(status: int, error_type: str, message: str) -> dict[str, Any]:
        return {"status": "error", "error_type": error_type, "message": message, "data": None}

    form = {"exchange": "NSE", "tradingsymbol": "INFY", "transaction_type": "BUY", "quantity": "1",
            "product": "MIS", "order_type": "MARKET", "market_protection": "-1"}
    auth = {"X-Kite-Version": "3", "Authorization": f"token {account['api_key']}:{account['access_token']}"}
    wrong = auth | {"Authorization": f"token {account['api_key']}:not-the-token"}
    cases = [
        ("POST", "/orders/regular", wrong, form, 403,
         error(403, "TokenException", "Incorrect `api_key` or `access_token`.")),
        ("GET", "/orders/999", wrong, None, 403, error(403, "TokenException", "Incorrect `api_key` or `access_token`.")),
        ("GET", "/orders/999", auth, None, 400, error(400, "InputException", "Couldn't find that `order_id`.")),
        ("POST", "/orders/regular", auth, form | {"tradingsymbol": "NOPE"}, 400,
         error(400, "InputException", "Invalid `tradingsymbol` or `exchange`: NSE:NOPE.")),
        ("POST", "/orders/nope", auth, form, 400, error(400, "InputException", "Invalid or unsupported `variety`: nope.")),
    ]
    for method, path, headers, data, status, body in cases:
        resp = requests.request(method, sim_url + path, headers=headers, data=data, timeout=5)
        assert (resp.status_code, resp.headers["Content-Type"], resp.json()) == (status, "application/json", body), path
    placed = requests.post(sim_url + "/orders/regular", headers=auth, data=form, timeout=5)
    assert placed.status_code == 200 and placed.headers["Content-Type"] == "application/json"
    order_id = placed.json()["data"]["order_id"]
    assert placed.content == b'{"status":"success","data":{"order_id":"' + order_id.encode() + b'"}}'
    history = requests.get(f"{sim_url}/orders/{order_id}", headers=auth, timeout=5)
    assert history.status_code == 200 and history.headers["Content-Type"] == "application/json"
    assert history.content.startswith(b'{"status":"success","data":[{"placed_by":')
    statuses = [h["status"] for h in history.json()["data"]]
    assert statuses == [h["status"] for h in kite.order_history(order_id)] and statuses[-1] == "COMPLETE"
