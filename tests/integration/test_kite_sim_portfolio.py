"""The simulator's portfolio (margins, holdings, positions, convert_position) via the official client."""

from __future__ import annotations

from typing import Any

import pytest
from kiteconnect import KiteConnect
from kiteconnect.exceptions import InputException, TokenException

from services.kite_sim.portfolio import DEFAULT_OPENING_CASH as OPENING
from tests.support.kite_sim import SimAdmin, SimError

SEGMENT_FIELDS = {"enabled", "net", "available", "utilised"}
AVAILABLE_FIELDS = {"adhoc_margin", "cash", "opening_balance", "live_balance", "collateral", "intraday_payin"}
UTILISED_FIELDS = {"debits", "exposure", "m2m_realised", "m2m_unrealised", "option_premium", "payout", "span",
                   "holding_sales", "turnover", "liquid_collateral", "stock_collateral", "delivery"}
POSITION_FIELDS = {
    "tradingsymbol", "exchange", "instrument_token", "product", "quantity", "overnight_quantity", "multiplier",
    "average_price", "close_price", "last_price", "value", "pnl", "m2m", "unrealised", "realised", "buy_quantity",
    "buy_price", "buy_value", "buy_m2m", "sell_quantity", "sell_price", "sell_value", "sell_m2m",
    "day_buy_quantity", "day_buy_price", "day_buy_value", "day_sell_quantity", "day_sell_price", "day_sell_value",
}
HOLDING_FIELDS = {
    "tradingsymbol", "exchange", "instrument_token", "isin", "product", "price", "quantity", "used_quantity",
    "t1_quantity", "realised_quantity", "authorised_quantity", "authorised_date", "authorisation",
    "opening_quantity", "short_quantity", "collateral_quantity", "collateral_type", "discrepancy",
    "average_price", "last_price", "close_price", "pnl", "day_change", "day_change_percentage", "mtf",
}


def order(kite: KiteConnect, symbol: str, side: str, qty: int, product: str = "MIS", **extra: Any) -> str:
    params: dict[str, Any] = {"order_type": "MARKET", "market_protection": -1} | extra
    return kite.place_order(variety="regular", exchange="NSE", tradingsymbol=symbol, transaction_type=side,
                            quantity=qty, product=product, **params)


def test_margins_block_mis_on_fill_and_release_on_square_off(paper_kite: KiteConnect, sim: SimAdmin) -> None:
    fresh = paper_kite.margins()
    assert set(fresh) == {"equity", "commodity"}
    for segment in fresh.values():
        assert set(segment) == SEGMENT_FIELDS
        assert set(segment["available"]) == AVAILABLE_FIELDS and set(segment["utilised"]) == UTILISED_FIELDS
    equity = fresh["equity"]
    assert equity["net"] == equity["available"]["opening_balance"] == equity["available"]["cash"] == OPENING
    assert equity["utilised"]["debits"] == 0
    assert paper_kite.margins("commodity") == fresh["commodity"]

    sim.ticks(("INFY", 1500.0))
    order(paper_kite, "INFY", "BUY", 10)
    held = paper_kite.margins("equity")
    assert held["utilised"]["exposure"] == pytest.approx(3000.0)  # 20% of 10 x 1500
    assert held["net"] == pytest.approx(OPENING - 3000.0)

    sim.ticks(("INFY", 1480.0))  # an open loss is blocked too
    losing = paper_kite.margins("equity")["utilised"]
    assert losing["m2m_unrealised"] == pytest.approx(200.0)
    assert losing["debits"] == pytest.approx(0.2 * 10 * 1480 + 200.0)

    sim.ticks(("INFY", 1520.0))
    order(paper_kite, "INFY", "SELL", 10)
    squared = paper_kite.margins("equity")
    assert squared["utilised"]["exposure"] == 0
    assert squared["utilised"]["m2m_realised"] == pytest.approx(-200.0)  # a booked profit is money back
    assert squared["net"] == pytest.approx(OPENING + 200.0)

    with pytest.raises(InputException, match="segment") as info:
        paper_kite.margins("currency")
    assert info.value.code == 400


def test_pending_limit_order_blocks_margin_until_cancelled(paper_kite: KiteConnect, sim: SimAdmin) -> None:
    sim.ticks(("SBIN", 800.0))
    order_id = order(paper_kite, "SBIN", "BUY", 50, order_type="LIMIT", price=700.0)
    assert paper_kite.margins("equity")["utilised"]["exposure"] == pytest.approx(0.2 * 50 * 800.0)
    paper_kite.cancel_order("regular", order_id)
    assert paper_kite.margins("equity")["utilised"]["exposure"] == 0


def test_positions_have_day_and_net_marked_to_the_live_price(paper_kite: KiteConnect, sim: SimAdmin) -> None:
    sim.ticks(("TCS", 3900.0))
    order(paper_kite, "TCS", "BUY", 4)
    sim.ticks(("TCS", 3950.0))
    order(paper_kite, "TCS", "SELL", 1)
    sim.ticks(("TCS", 3910.0))
    positions = paper_kite.positions()
    assert set(positions) == {"net", "day"}
    (net,) = positions["net"]
    assert set(net) == POSITION_FIELDS
    assert positions["day"] == positions["net"]
    assert (net["quantity"], net["buy_quantity"], net["sell_quantity"]) == (3, 4, 1)
    assert net["last_price"] == 3910.0 and net["average_price"] == 3900.0
    assert net["realised"] == pytest.approx(50.0)
    assert net["unrealised"] == pytest.approx(30.0)
    assert net["pnl"] == net["m2m"] == pytest.approx(80.0)
    assert (net["buy_value"], net["sell_value"]) == (15600.0, 3950.0)


def test_convert_position_moves_quantity_between_products(paper_kite: KiteConnect, sim: SimAdmin) -> None:
    sim.ticks(("ITC", 400.0))
    order(paper_kite, "ITC", "BUY", 10)
    assert paper_kite.convert_position(exchange="NSE", tradingsymbol="ITC", transaction_type="BUY", position_type="day",
                                 quantity=4, old_product="MIS", new_product="CNC") is True
    by_product = {p["product"]: p for p in paper_kite.positions()["net"]}
    assert by_product["MIS"]["quantity"] == 6 and by_product["CNC"]["quantity"] == 4
    assert by_product["CNC"]["average_price"] == 400.0
    utilised = paper_kite.margins("equity")["utilised"]
    assert utilised["delivery"] == pytest.approx(1600.0)  # CNC holds the full value
    assert utilised["exposure"] == pytest.approx(0.2 * 6 * 400.0)

    paper_kite.convert_position("NSE", "ITC", "BUY", "day", 6, "MIS", "CNC")
    assert [p["product"] for p in paper_kite.positions()["net"]] == ["CNC"]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"quantity": 11}, "only 10 open"),
        ({"transaction_type": "SELL"}, "No open SELL"),
        ({"old_product": "CNC", "new_product": "MIS"}, "No open BUY CNC"),
        ({"new_product": "MIS"}, "product"),
        ({"new_product": "BO"}, "product"),
        ({"position_type": "overnight"}, "overnight"),
        ({"position_type": "week"}, "position_type"),
        ({"tradingsymbol": "NOPE"}, "tradingsymbol"),
        ({"quantity": 0}, "quantity"),
        ({"transaction_type": "HOLD"}, "transaction_type"),
    ],
)
def test_convert_position_errors(paper_kite: KiteConnect, sim: SimAdmin, overrides: dict[str, Any],
                                 fragment: str) -> None:
    sim.ticks(("LT", 3000.0))
    order(paper_kite, "LT", "BUY", 10)
    params = dict(exchange="NSE", tradingsymbol="LT", transaction_type="BUY", position_type="day", quantity=5,
                  old_product="MIS", new_product="CNC") | overrides
    with pytest.raises(InputException, match=fragment) as info:
        paper_kite.convert_position(**params)
    assert info.value.code == 400
    assert [(p["product"], p["quantity"]) for p in paper_kite.positions()["net"]] == [("MIS", 10)]


def test_holdings_are_empty_then_seeded_and_marked_to_market(paper_kite: KiteConnect, sim: SimAdmin,
                                                            paper_account: dict[str, Any]) -> None:
    assert paper_kite.holdings() == []
    seeded = sim.call("POST", f"/sim/accounts/{paper_account['api_key']}/portfolio",
                        {"cash": 250000, "holdings": [{"tradingsymbol": "INFY", "quantity": 20,
                                                       "average_price": 1400.0}]})
    assert seeded == {"cash": 250000.0, "commodity_cash": 0.0, "holdings": 1}
    sim.ticks(("INFY", 1530.0))
    (holding,) = paper_kite.holdings()
    assert set(holding) == HOLDING_FIELDS
    assert (holding["tradingsymbol"], holding["quantity"], holding["product"]) == ("INFY", 20, "CNC")
    assert holding["last_price"] == 1530.0 and holding["close_price"] == 1500.0
    assert holding["pnl"] == pytest.approx(2600.0) and holding["day_change"] == pytest.approx(30.0)
    assert holding["day_change_percentage"] == pytest.approx(2.0)
    assert len(holding["isin"]) == 12 and holding["used_quantity"] == 0
    assert paper_kite.margins("equity")["available"]["opening_balance"] == 250000.0

    order(paper_kite, "INFY", "SELL", 5, product="CNC")  # selling from holdings uses them
    assert paper_kite.holdings()[0]["used_quantity"] == 5
    assert paper_kite.margins("equity")["utilised"]["holding_sales"] == pytest.approx(5 * 1530.0)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"holdings": [{"tradingsymbol": "NOPE", "quantity": 1, "average_price": 1}]}, "400"),
        ({"holdings": [{"tradingsymbol": "INFY", "quantity": 0, "average_price": 1}]}, "400"),
        ({"cash": -1}, "400"),
        ({"cash": "lots"}, "400"),
    ],
)
def test_seeding_a_portfolio_validates_the_body(sim: SimAdmin, paper_account: dict[str, Any], body: dict[str, Any],
                                                status: str) -> None:
    with pytest.raises(SimError, match=f"-> {status}"):
        sim.call("POST", f"/sim/accounts/{paper_account['api_key']}/portfolio", body)


def test_portfolio_is_private_to_its_account(paper_kite: KiteConnect, sim: SimAdmin) -> None:
    sim.ticks(("HDFCBANK", 1600.0))
    order(paper_kite, "HDFCBANK", "BUY", 3)
    other = sim.create_account()
    other_kite = KiteConnect(other["api_key"], access_token=other["access_token"], root=sim.base_url)
    assert other_kite.positions() == {"net": [], "day": []}
    assert other_kite.margins("equity")["utilised"]["exposure"] == 0
    with pytest.raises(SimError, match="-> 404"):
        sim.call("POST", "/sim/accounts/simnosuchkey/portfolio", {"cash": 1})
    stranger = KiteConnect(other["api_key"], access_token="0" * 32, root=sim.base_url)
    for call in (stranger.margins, stranger.holdings, stranger.positions):
        with pytest.raises(TokenException):
            call()
