"""Paper trading on live prices: one simulator takes its ticks from another one's KiteTicker."""

from __future__ import annotations

import datetime as dt
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest
from kiteconnect import KiteConnect
from kiteconnect.exceptions import NetworkException

from services.kite_sim.__main__ import parse_args
from tests.integration.test_kite_sim_ticker import TickerProbe
from tests.support.eventually import eventually_sync
from tests.support.kite_sim import SimAdmin, run_sim, ws_root

INFY = 408065
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read()
            return resp.status, orjson.loads(body) if body.startswith(b"{") else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_paper_simulator_follows_the_upstream_ticker(monkeypatch: pytest.MonkeyPatch) -> None:
    with run_sim(tick_interval_ms=0, seed=2) as upstream_url:
        market = SimAdmin(upstream_url)
        feed = market.create_account("live market data")
        live = KiteConnect(feed["api_key"], access_token=feed["access_token"], root=upstream_url)
        # The token comes from the environment, as it should in production (a flag shows in `ps`).
        monkeypatch.setenv("KITE_SIM_UPSTREAM_ACCESS_TOKEN", feed["access_token"])
        market.ticks(("INFY", 1111.1))  # the live price when the paper broker starts
        before_start = dt.datetime.now(IST).replace(tzinfo=None, second=0, microsecond=0)
        # A fast walk that must stay off: with upstream prices it would be a second price source.
        with run_sim(tick_interval_ms=20, upstream_api_key=feed["api_key"],
                     upstream_ws_url=ws_root(upstream_url)) as url:
            paper = SimAdmin(url)
            acct = paper.create_account("paper trader")
            kite = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=url, timeout=10)
            eventually_sync(lambda: get(url + "/readyz")[0] == 200, timeout=15, message="upstream never connected")
            probe = TickerProbe(url, acct["api_key"], acct["access_token"]).start()
            try:
                eventually_sync(lambda: probe.connects >= 1, timeout=10, message="paper ticker never connected")
                probe.call("subscribe", [INFY])
                probe.wait_tick(INFY, last_price=1111.1, timeout=10)
                since = probe.mark()
                # Generated history before the start ends at the first live price, not the dump's.
                now = dt.datetime.now(IST).replace(tzinfo=None)
                candles = kite.historical_data(INFY, now - dt.timedelta(days=5), now, "minute")
                generated = [c for c in candles if c["date"].replace(tzinfo=None) < before_start]
                assert generated[-1]["close"] == 1111.1

                market.ticks(("INFY", 1234.5), ("TCS", 3333.3))
                eventually_sync(lambda: kite.ltp("NSE:INFY", "NSE:TCS") == {
                    "NSE:INFY": {"instrument_token": INFY, "last_price": 1234.5},
                    "NSE:TCS": {"instrument_token": 2953217, "last_price": 3333.3}}, timeout=10,
                    message="paper prices did not follow upstream")
                probe.wait_tick(INFY, since, last_price=1234.5, timeout=10)
                mirrored, source = kite.quote("NSE:INFY")["NSE:INFY"], live.quote("NSE:INFY")["NSE:INFY"]
                assert mirrored["ohlc"] == source["ohlc"] and mirrored["volume"] == source["volume"]
                assert kite.ltp("NSE:RELIANCE")["NSE:RELIANCE"]["last_price"] == 2450.0  # the walk stayed off

                order_id = kite.place_order(variety="regular", exchange="NSE", tradingsymbol="INFY",
                                            transaction_type="BUY", quantity=2, product="MIS",
                                            order_type="MARKET", market_protection=-1)
                assert kite.order_history(order_id)[-1]["average_price"] == 1234.5
                assert live.orders() == []  # paper orders never reach the upstream account
            finally:
                probe.stop()
            status, metrics = get(url + "/metrics")
            assert status == 200 and "kite_sim_upstream_connected 1.0" in metrics

            # With the upstream's REST root, candles come from the upstream: the ones its ticks belong to.
            with run_sim(tick_interval_ms=0, upstream_api_key=feed["api_key"], upstream_ws_url=ws_root(upstream_url),
                         upstream_root=upstream_url) as charts_url:
                chartist = SimAdmin(charts_url).create_account()
                charts = KiteConnect(chartist["api_key"], access_token=chartist["access_token"], root=charts_url,
                                     timeout=10)
                assert charts.historical_data(INFY, now - dt.timedelta(days=5), now, "minute", oi=True) == \
                    live.historical_data(INFY, now - dt.timedelta(days=5), now, "minute", oi=True)

                # An expired upstream token freezes prices and makes the paper brokers not ready.
                market.expire(feed["api_key"])
                for paper_url in (url, charts_url):
                    eventually_sync(lambda u=paper_url: get(u + "/readyz")[0] == 503, timeout=20,
                                    message="expired upstream token still reported ready")
                assert get(url + "/readyz")[1]["checks"]["upstream"].startswith("error")
                # The upstream's refusal is not the paper user's token problem.
                with pytest.raises(NetworkException, match="Upstream") as info:
                    charts.historical_data(INFY, now - dt.timedelta(days=1), now, "minute")
                assert info.value.code == 502


def test_upstream_needs_both_key_and_token(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    monkeypatch.delenv("KITE_SIM_UPSTREAM_ACCESS_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--upstream-api-key", "simabc"])
    assert "both an api key and an access token" in capsys.readouterr().err
    monkeypatch.setenv("KITE_SIM_UPSTREAM_ACCESS_TOKEN", "t" * 32)
    args = parse_args(["--upstream-api-key", "simabc", "--upstream-ws-url", "ws://127.0.0.1:1/ws"])
    assert (args.upstream_api_key, args.upstream_access_token) == ("simabc", "t" * 32)
