"""The simulator's market data (quote, ohlc, ltp, trigger_range, historical, full ticks) via the official client."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from kiteconnect import KiteConnect
from kiteconnect.exceptions import InputException, TokenException

from tests.integration.test_kite_sim_ticker import TickerProbe
from tests.support.eventually import eventually_sync
from tests.support.kite_sim import SimAdmin

IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
INFY, TCS = 408065, 2953217

# Field -> type of every field in Kite's published samples (kiteconnect-mocks quote.json, ohlc.json, ltp.json).
QUOTE_FIELDS = {
    "instrument_token": int, "timestamp": dt.datetime, "last_trade_time": dt.datetime, "last_price": float,
    "last_quantity": int, "buy_quantity": int, "sell_quantity": int, "volume": int, "average_price": float,
    "oi": int, "oi_day_high": int, "oi_day_low": int, "net_change": float, "lower_circuit_limit": float,
    "upper_circuit_limit": float, "ohlc": dict, "depth": dict,
}
DEPTH_FIELDS = {"price": float, "quantity": int, "orders": int}


def assert_shape(row: dict[str, Any], fields: dict[str, type]) -> None:
    assert set(row) == set(fields), set(row) ^ set(fields)
    for name, kind in fields.items():
        assert isinstance(row[name], kind), (name, row[name])


def test_quote_has_every_kite_field_with_depth_around_the_last_price(paper_kite: KiteConnect, sim: SimAdmin) -> None:
    sim.ticks(("INFY", 1512.35))
    quotes = paper_kite.quote("NSE:INFY", str(TCS), "NSE:NOPE")
    assert set(quotes) == {"NSE:INFY", str(TCS)}  # unknown instruments are left out, as Kite does
    q = quotes["NSE:INFY"]
    assert_shape(q, QUOTE_FIELDS)
    assert q["instrument_token"] == INFY and q["last_price"] == 1512.35
    assert q["ohlc"] == {"open": 1500.0, "high": 1512.35, "low": 1500.0, "close": 1500.0}
    assert q["net_change"] == pytest.approx(12.35)
    # The order rules' price band: 20% around the close, widened to hold the last price.
    assert q["lower_circuit_limit"] == 1200.0 and q["upper_circuit_limit"] == pytest.approx(1814.8)
    assert abs(q["timestamp"] - dt.datetime.now()).total_seconds() < 24 * 3600  # IST wall clock, parsed by client
    bids, asks = q["depth"]["buy"], q["depth"]["sell"]
    assert len(bids) == len(asks) == 5
    for level in bids + asks:
        assert_shape(level, DEPTH_FIELDS)
    # The book matching fills against: asks from the last price up, bids from it down, seeded sizes.
    assert [b["price"] for b in bids] == [1512.35, 1512.30, 1512.25, 1512.20, 1512.15]
    assert [a["price"] for a in asks] == [1512.35, 1512.40, 1512.45, 1512.50, 1512.55]
    assert all(250 <= level["quantity"] <= 750 and level["orders"] == 1 for level in bids + asks)
    assert q["buy_quantity"] == q["sell_quantity"] == 5 * 500
    assert quotes[str(TCS)]["instrument_token"] == TCS


def test_ohlc_and_ltp_answer_many_instruments_at_once(paper_kite: KiteConnect, sim: SimAdmin) -> None:
    sim.ticks(("INFY", 1490.0), ("TCS", 3905.5))
    ohlc = paper_kite.ohlc(["NSE:INFY", "NSE:TCS", "NSE:NOPE"])
    assert set(ohlc) == {"NSE:INFY", "NSE:TCS"}
    assert ohlc["NSE:INFY"] == {"instrument_token": INFY, "last_price": 1490.0,
                                "ohlc": {"open": 1500.0, "high": 1500.0, "low": 1490.0, "close": 1500.0}}
    ltp = paper_kite.ltp("NSE:INFY", "NSE:TCS", str(INFY))
    assert ltp == {"NSE:INFY": {"instrument_token": INFY, "last_price": 1490.0},
                   "NSE:TCS": {"instrument_token": TCS, "last_price": 3905.5},
                   str(INFY): {"instrument_token": INFY, "last_price": 1490.0}}


def test_trigger_range_is_below_last_for_buy_and_above_for_sell(paper_kite: KiteConnect, sim: SimAdmin) -> None:
    sim.ticks(("INFY", 1000.0))
    buy = paper_kite.trigger_range("BUY", "NSE:INFY")["NSE:INFY"]
    sell = paper_kite.trigger_range("sell", ["NSE:INFY"])["NSE:INFY"]
    assert buy == {"instrument_token": INFY, "lower": 950.0, "upper": 1000.0}
    assert sell == {"instrument_token": INFY, "lower": 1000.0, "upper": 1050.0}
    with pytest.raises(InputException, match="transaction_type"):
        paper_kite.trigger_range("HOLD", "NSE:INFY")


def test_market_data_errors_are_kite_exceptions(paper_kite: KiteConnect, paper_account: dict[str, Any]) -> None:
    for call in (paper_kite.quote, paper_kite.ohlc, paper_kite.ltp):
        with pytest.raises(InputException, match="No instruments") as info:
            call()
        assert info.value.code == 400
    with pytest.raises(InputException, match="at most 500"):
        paper_kite.quote([f"NSE:X{i}" for i in range(501)])
    with pytest.raises(InputException, match="at most 1000"):
        paper_kite.ltp([f"NSE:X{i}" for i in range(1001)])
    stranger = KiteConnect(paper_account["api_key"], access_token="0" * 32, root=paper_kite.root)
    with pytest.raises(TokenException):
        stranger.quote("NSE:INFY")


def ist_now() -> dt.datetime:
    return dt.datetime.now(IST).replace(tzinfo=None, microsecond=0)


def test_minute_candles_follow_the_ticked_prices_after_a_back_history_ending_at_the_start_price(
        paper_kite: KiteConnect, sim: SimAdmin) -> None:
    started = dt.datetime.now(IST)
    for price in (1510.0, 1490.0, 1505.5):
        sim.ticks(("INFY", price))
    now = ist_now() + dt.timedelta(minutes=1)
    candles = paper_kite.historical_data(INFY, now - dt.timedelta(days=5), now, "minute")
    live = [c for c in candles if c["date"] >= started.replace(second=0, microsecond=0)]
    back = candles[:len(candles) - len(live)]
    assert back, "no generated history before the start"
    assert back[-1]["close"] == 1500.0  # generated history ends where the simulator started
    assert all(c["date"].weekday() < 5 and dt.time(9, 15) <= c["date"].time() <= dt.time(15, 29) for c in back)
    assert all(c["low"] <= min(c["open"], c["close"]) <= max(c["open"], c["close"]) <= c["high"] for c in candles)
    assert live and live[0]["open"] == 1510.0 and live[-1]["close"] == 1505.5
    assert max(c["high"] for c in live) == 1510.0 and min(c["low"] for c in live) == 1490.0
    assert sum(c["volume"] for c in live) == 3
    assert str(candles[0]["date"].utcoffset()) == "5:30:00"
    # The same request answers the same candles: the history is seeded, not drawn anew.
    assert paper_kite.historical_data(INFY, now - dt.timedelta(days=5), now, "minute") == candles


def test_day_and_multi_minute_candles_agree_with_minute_candles(paper_kite: KiteConnect, sim: SimAdmin) -> None:
    sim.ticks(("INFY", 1525.0))
    now = ist_now() + dt.timedelta(minutes=1)
    frm = now - dt.timedelta(days=8)
    minutes = paper_kite.historical_data(INFY, frm, now, "minute")
    days = paper_kite.historical_data(INFY, frm.strftime("%Y-%m-%d"), now.strftime("%Y-%m-%d"), "day")
    for day in days:
        own = [c for c in minutes if c["date"].date() == day["date"].date()]
        if not own:  # the first day's minutes before `frm`'s time are outside the minute request
            continue
        assert day["close"] == own[-1]["close"] and day["high"] >= max(c["high"] for c in own)
    assert days[-1]["close"] == 1525.0 and days[-1]["high"] >= 1525.0
    fifteen = paper_kite.historical_data(INFY, frm, now, "15minute", oi=True)
    assert all(c["date"].minute % 15 == 0 and c["oi"] == 0 for c in fifteen)
    assert fifteen[-1]["close"] == 1525.0
    assert sum(c["volume"] for c in fifteen) == sum(c["volume"] for c in minutes)
    long_ago = paper_kite.historical_data(INFY, "2021-01-01", "2021-01-10", "day")
    assert [c["date"].day for c in long_ago] == [1, 4, 5, 6, 7, 8]  # weekdays only


@pytest.mark.parametrize(
    ("token", "interval", "frm", "to", "fragment"),
    [
        (1, "minute", "2024-01-01", "2024-01-02", "instrument_token"),
        (INFY, "2minute", "2024-01-01", "2024-01-02", "interval"),
        (INFY, "minute", "2024-01-05", "2024-01-01", "after"),
        (INFY, "minute", "2024-01-01", "2024-04-01", "60 days"),
        (INFY, "day", "2010-01-01", "2024-01-01", "2000 days"),
        (INFY, "day", "yesterday", "2024-01-01", "from"),
    ],
)
def test_historical_data_errors(paper_kite: KiteConnect, token: int, interval: str, frm: str, to: str,
                                fragment: str) -> None:
    with pytest.raises(InputException, match=fragment) as info:
        paper_kite.historical_data(token, frm, to, interval)
    assert info.value.code == 400


def test_full_mode_ticks_carry_the_same_depth_as_quote(paper_kite: KiteConnect, sim: SimAdmin,
                                                       paper_account: dict[str, Any]) -> None:
    probe = TickerProbe(sim.base_url, paper_account["api_key"], paper_account["access_token"]).start()
    try:
        eventually_sync(lambda: probe.connects >= 1, timeout=10, message="ticker never connected")
        probe.call("subscribe", [INFY])
        probe.call("set_mode", probe.kt.MODE_FULL, [INFY])
        since = probe.mark()
        sim.ticks(("INFY", 1433.4))
        tick = probe.wait_tick(INFY, since, mode="full", last_price=1433.4, timeout=10)
        quote = paper_kite.quote("NSE:INFY")["NSE:INFY"]
        assert tick["depth"] == quote["depth"]
        assert tick["ohlc"] == quote["ohlc"] and tick["volume_traded"] == quote["volume"]
        assert tick["total_buy_quantity"] == quote["buy_quantity"]
        assert tick["oi"] == 0 and isinstance(tick["exchange_timestamp"], dt.datetime)
    finally:
        probe.stop()
