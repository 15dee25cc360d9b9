"""The paper broker keeps accounts, tokens, orders, trades and positions across restarts (`--state-file`)."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from kiteconnect import KiteConnect
from kiteconnect.exceptions import TokenException

from services.kite_sim.book import Book
from services.kite_sim.market import Market, load_instruments
from services.kite_sim.portfolio import Portfolio, PortfolioIn
from services.kite_sim.store import Encoder, StateStore
from tests.support.eventually import eventually_sync
from tests.support.kite_sim import SimAdmin, run_sim


def order(kite: KiteConnect, symbol: str, side: str, qty: int, **extra: Any) -> str:
    params: dict[str, Any] = {"order_type": "MARKET", "market_protection": -1} | extra
    return kite.place_order(variety="regular", exchange="NSE", tradingsymbol=symbol, transaction_type=side,
                            quantity=qty, product="MIS", **params)


def everything(kite: KiteConnect) -> dict[str, Any]:
    orders = kite.orders()
    return {"profile": kite.profile(), "orders": orders, "trades": kite.trades(), "positions": kite.positions(),
            "holdings": kite.holdings(), "margins": kite.margins(),
            "histories": {o["order_id"]: kite.order_history(o["order_id"]) for o in orders}}


def test_state_survives_a_sigterm_restart(tmp_path: Path) -> None:
    state = tmp_path / "kite_sim.state"
    with run_sim(tick_interval_ms=0, state_file=state) as url:
        admin = SimAdmin(url)
        acct = admin.create_account("Persistent Pat")
        first = KiteConnect(acct["api_key"], root=url, timeout=10)
        session = first.generate_session(admin.request_token(acct["api_key"]), api_secret=acct["api_secret"])
        kite = KiteConnect(acct["api_key"], access_token=session["access_token"], root=url, timeout=10)
        admin.ticks(("INFY", 1500.0), ("SBIN", 800.0))
        order(kite, "INFY", "BUY", 10, tag="TWPERSIST1")
        admin.ticks(("INFY", 1510.0))
        order(kite, "INFY", "SELL", 4)
        resting = order(kite, "SBIN", "BUY", 5, order_type="LIMIT", price=790.0)
        stop = order(kite, "INFY", "SELL", 2, order_type="SL-M", trigger_price=1450.0)
        assert kite.order_history(stop)[-1]["status"] == "TRIGGER PENDING"
        admin.call("POST", f"/sim/accounts/{acct['api_key']}/portfolio",
                   {"holdings": [{"tradingsymbol": "TCS", "quantity": 3, "average_price": 3500}]})
        before = everything(kite)
        ready = orjson.loads(urllib.request.urlopen(url + "/readyz", timeout=5).read())
        assert ready == {"status": "ready", "checks": {"state_file": "ok"}}
    assert state.stat().st_mode & 0o777 == 0o600  # it holds api secrets

    with run_sim(tick_interval_ms=0, state_file=state) as url:
        kite = KiteConnect(acct["api_key"], access_token=session["access_token"], root=url, timeout=10)
        assert everything(kite) == before
        stale = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=url)
        with pytest.raises(TokenException):
            stale.profile()  # the token rotated by generate_session stays rotated
        # The resting LIMIT order still rests, and fills on the next tick that crosses it.
        SimAdmin(url).ticks(("SBIN", 789.0), ("INFY", 1449.0))
        assert [h["status"] for h in kite.order_history(resting)][-1] == "COMPLETE"
        assert kite.order_history(stop)[-1]["status"] == "COMPLETE"  # the stop still watched the ticks
        fresh = order(kite, "ITC", "BUY", 1)
        assert fresh > max(o["order_id"] for o in before["orders"])  # ids go on counting, never reused
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert "kite_sim_accounts 1.0" in metrics and "kite_sim_state_writes_total" in metrics


def test_what_was_saved_before_a_kill_9_survives(tmp_path: Path) -> None:
    state = tmp_path / "kite_sim.state"
    with run_sim(tick_interval_ms=0, state_file=state) as url:
        admin = SimAdmin(url)
        acct = admin.create_account()
        kite = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=url, timeout=10)
        order_id = order(kite, "RELIANCE", "BUY", 7)
        eventually_sync(lambda: state.exists() and order_id.encode() in state.read_bytes(), timeout=10,
                        message="order never reached the state file")
        os.kill(admin.health()["pid"], signal.SIGKILL)
    with run_sim(tick_interval_ms=0, state_file=state) as url:
        kite = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=url, timeout=10)
        (entry,) = [o for o in kite.orders() if o["order_id"] == order_id]
        assert entry["status"] == "COMPLETE" and entry["filled_quantity"] == 7
        assert [(p["tradingsymbol"], p["quantity"]) for p in kite.positions()["net"]] == [("RELIANCE", 7)]


def test_an_unreadable_state_file_is_moved_aside_and_the_sim_starts_empty(tmp_path: Path) -> None:
    state = tmp_path / "kite_sim.state"
    state.write_bytes(b'{"version": 1, "state": {"$dc": "NoSuchType"')
    with run_sim(tick_interval_ms=0, state_file=state) as url:
        assert SimAdmin(url).health()["accounts"] == 0
    assert [p.name.startswith("kite_sim.state.broken-") for p in tmp_path.iterdir()].count(True) == 1


def test_codec_round_trips_every_field_and_keeps_shared_objects_shared(tmp_path: Path) -> None:
    instruments = load_instruments()
    market = Market(instruments)
    book = Book(market)
    portfolio = Portfolio(market, book)
    account = book.create_account("Round Trip")
    ins = market.resolve("NSE:INFY")
    assert ins is not None
    filled = book.new_order(account, ins, variety="regular", transaction_type="BUY", quantity=3, product="MIS",
                            order_type="MARKET", validity="DAY", price_paise=0, market_protection=-1, tag="T1")
    book.execute(filled)
    resting = book.new_order(account, ins, variety="regular", transaction_type="BUY", quantity=2, product="MIS",
                             order_type="LIMIT", validity="DAY", price_paise=100_00, market_protection=0, tag=None)
    book.execute(resting)
    book.issue_request_token(account)
    portfolio.seed(account, PortfolioIn.model_validate({"holdings": [{"tradingsymbol": "TCS", "quantity": 1,
                                                                      "average_price": 10}]}))
    book.order_listeners = [lambda order: None]  # type: ignore[attr-defined]  # callbacks are not state
    StateStore(tmp_path / "s", market, book, portfolio).save()

    market2 = Market(instruments)
    book2 = Book(market2)
    portfolio2 = Portfolio(market2, book2)
    StateStore(tmp_path / "s", market2, book2, portfolio2).load()
    # Encoding walks every dataclass field generically, so equal encodings mean every field came back.
    assert Encoder().encode_parts(book2.snapshot()) == Encoder().encode_parts(book.snapshot())
    assert Encoder().encode(portfolio2.funds) == Encoder().encode(portfolio.funds)
    account2 = book2.accounts[account.api_key]
    assert book2.orders[filled.order_id] is account2.orders[filled.order_id]
    assert account2.orders[filled.order_id].account is account2
    assert book2.open_limits[ins.instrument_token][resting.order_id] is book2.orders[resting.order_id]
    assert account2.orders[filled.order_id].instrument is market2.resolve("NSE:INFY")
