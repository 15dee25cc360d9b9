"""The Kite simulator's tick WebSocket, driven through the official threaded KiteTicker.

KiteTicker runs on Twisted's one global reactor in a daemon thread; every
call into it from the test thread goes through `reactor.callFromThread`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from kiteconnect import KiteConnect, KiteTicker
from twisted.internet import reactor

from tests.support.eventually import eventually_sync
from tests.support.kite_sim import SimAdmin, run_sim, ws_root

pytest_plugins = ["tests.integration.kite_sim_support"]  # admin, account

RECONNECT_DELAY_S = 0.2


class TickerProbe:
    """A KiteTicker that records what it receives."""

    def __init__(self, base_url: str, api_key: str, access_token: str) -> None:
        self.kt = KiteTicker(api_key, access_token, root=ws_root(base_url), reconnect_max_delay=5)
        self.lock = threading.Lock()
        self.ticks: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.connects = 0
        self.closes: list[tuple[Any, str]] = []
        self.kt.on_ticks = self._on_ticks
        self.kt.on_message = self._on_message
        self.kt.on_connect = self._on_connect
        self.kt.on_close = self._on_close
        self.kt.on_error = self._on_close

    def _on_ticks(self, ws: Any, ticks: list[dict[str, Any]]) -> None:
        with self.lock:
            self.ticks.extend(ticks)

    def _on_message(self, ws: Any, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            with self.lock:
                self.raw.append(payload)

    def _on_connect(self, ws: Any, response: Any) -> None:
        # Runs before the factory's resetDelay(), so reconnects after a drop come quickly.
        factory = self.kt.factory
        factory.initialDelay, factory.factor, factory.jitter = RECONNECT_DELAY_S, 1.0, 0
        with self.lock:
            self.connects += 1

    def _on_close(self, ws: Any, code: Any, reason: Any) -> None:
        with self.lock:
            self.closes.append((code, str(reason)))

    def start(self) -> TickerProbe:
        """Connect (starting the shared reactor thread on first use)."""
        if reactor.running:
            reactor.callFromThread(self.kt.connect, threaded=True)
        else:
            self.kt.connect(threaded=True)
            eventually_sync(lambda: reactor.running, timeout=5)
        return self

    def call(self, method: str, *args: Any) -> None:
        """Call a KiteTicker method on the reactor thread."""
        reactor.callFromThread(getattr(self.kt, method), *args)

    def stop(self) -> None:
        """Close for good (no reconnect)."""
        reactor.callFromThread(self.kt.close)

    def mark(self) -> int:
        """Return a position in the tick log to look after."""
        with self.lock:
            return len(self.ticks)

    def wait_tick(self, token: int, since: int = 0, timeout: float = 5.0, **expect: Any) -> dict[str, Any]:
        """Wait for a tick of `token` after `since` whose fields match `expect`."""

        def found() -> dict[str, Any] | None:
            with self.lock:
                for tick in self.ticks[since:]:
                    if tick["instrument_token"] == token and all(tick.get(k) == v for k, v in expect.items()):
                        return tick
            return None

        return eventually_sync(found, timeout=timeout, message=f"no tick {token} {expect}")


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with run_sim(tick_interval_ms=0, seed=3) as url:
        yield url


@pytest.fixture(scope="module")
def tokens(sim_url: str) -> dict[str, int]:
    acct = SimAdmin(sim_url).create_account()
    kite = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=sim_url)
    return {row["tradingsymbol"]: row["instrument_token"] for row in kite.instruments("NSE")}


@pytest.fixture
def probe(sim_url: str, account: dict[str, Any]) -> Iterator[TickerProbe]:
    probe = TickerProbe(sim_url, account["api_key"], account["access_token"]).start()
    eventually_sync(lambda: probe.connects >= 1, timeout=5, message="ticker never connected")
    yield probe
    probe.stop()


def test_ticks_arrive_in_quote_mode_then_ltp_and_full_with_exact_prices(
        probe: TickerProbe, admin: SimAdmin, tokens: dict[str, int]) -> None:
    infy, tcs = tokens["INFY"], tokens["TCS"]
    probe.call("subscribe", [infy, tcs])
    snapshot = probe.wait_tick(infy, mode="quote", last_price=1500.0)
    assert snapshot["ohlc"]["close"] == 1500.0

    since = probe.mark()
    admin.ticks(("INFY", 1512.35))
    quote = probe.wait_tick(infy, since, mode="quote", last_price=1512.35)
    assert quote["ohlc"]["high"] == 1512.35 and quote["ohlc"]["open"] == 1500.0
    assert quote["change"] == pytest.approx(0.8233, abs=1e-3)

    probe.call("set_mode", probe.kt.MODE_LTP, [infy])
    probe.call("set_mode", probe.kt.MODE_FULL, [tcs])
    probe.wait_tick(infy, since, mode="ltp")
    since = probe.mark()
    admin.ticks(("INFY", 1499.95), ("TCS", 3901.10))
    probe.wait_tick(infy, since, mode="ltp", last_price=1499.95)
    full = probe.wait_tick(tcs, since, mode="full", last_price=3901.10)
    assert len(full["depth"]["buy"]) == 5 and len(full["depth"]["sell"]) == 5
    # The depth matching fills against: bids from the last price down, asks from it up.
    assert [lvl["price"] for lvl in full["depth"]["buy"]] == [3901.10, 3901.05, 3901.00, 3900.95, 3900.90]
    assert [lvl["price"] for lvl in full["depth"]["sell"]] == [3901.10, 3901.15, 3901.20, 3901.25, 3901.30]
    # A 1-byte binary frame is Kite's heartbeat; the simulator sends one every second.
    eventually_sync(lambda: any(len(p) == 1 for p in probe.raw), timeout=3, message="no heartbeat")


def test_unsubscribe_stops_ticks_of_that_token_only(
        probe: TickerProbe, admin: SimAdmin, tokens: dict[str, int]) -> None:
    infy, sbin = tokens["INFY"], tokens["SBIN"]
    probe.call("subscribe", [infy, sbin])
    probe.wait_tick(infy)
    probe.wait_tick(sbin)
    probe.call("unsubscribe", [infy])
    # The socket handles messages in order: TCS's snapshot proves the unsubscribe is done.
    probe.call("subscribe", [tokens["TCS"]])
    probe.wait_tick(tokens["TCS"])
    since = probe.mark()
    admin.ticks(("INFY", 1400.0), ("SBIN", 777.0))
    # Both prices go out in one frame, so once SBIN's tick is here INFY's would be too.
    probe.wait_tick(sbin, since, last_price=777.0)
    with probe.lock:
        assert [t for t in probe.ticks[since:] if t["instrument_token"] == infy] == []


@pytest.mark.parametrize("abort", [False, True], ids=["close-frame", "tcp-abort"])
def test_ticker_reconnects_and_resubscribes_after_drop(
        probe: TickerProbe, admin: SimAdmin, tokens: dict[str, int], abort: bool) -> None:
    reliance = tokens["RELIANCE"]
    probe.call("subscribe", [reliance])
    probe.call("set_mode", probe.kt.MODE_LTP, [reliance])
    probe.wait_tick(reliance, mode="ltp")
    assert admin.drop_ws(abort=abort) == 1
    eventually_sync(lambda: probe.connects >= 2, timeout=5, message="ticker did not reconnect")
    since = probe.mark()
    admin.ticks(("RELIANCE", 2501.05))
    probe.wait_tick(reliance, since, mode="ltp", last_price=2501.05)


def test_bad_or_expired_credentials_are_refused(sim_url: str, admin: SimAdmin, account: dict[str, Any],
                                                probe: TickerProbe, tokens: dict[str, int]) -> None:
    intruder = TickerProbe(sim_url, account["api_key"], "f" * 32).start()
    try:
        eventually_sync(lambda: any("403" in reason for _, reason in intruder.closes), timeout=5,
                        message="bad token was not refused with 403")
        assert intruder.connects == 0
    finally:
        intruder.stop()

    probe.call("subscribe", [tokens["ITC"]])
    probe.wait_tick(tokens["ITC"])
    admin.expire(account["api_key"])
    eventually_sync(lambda: any("403" in reason for _, reason in probe.closes), timeout=5,
                    message="expired token kept streaming")
    assert probe.connects == 1


def test_random_walk_moves_subscribed_prices() -> None:
    with run_sim(tick_interval_ms=20, walk_bps=20, seed=11) as url:
        admin = SimAdmin(url)
        acct = admin.create_account()
        token = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=url).instruments()[0]
        probe = TickerProbe(url, acct["api_key"], acct["access_token"]).start()
        try:
            eventually_sync(lambda: probe.connects >= 1, timeout=5)
            probe.call("subscribe", [token["instrument_token"]])
            probe.call("set_mode", probe.kt.MODE_LTP, [token["instrument_token"]])

            def distinct_prices() -> bool:
                with probe.lock:
                    return len({t["last_price"] for t in probe.ticks}) >= 5

            started = time.monotonic()
            eventually_sync(distinct_prices, timeout=5, message="walk did not move the price")
            assert time.monotonic() - started < 5
        finally:
            probe.stop()


async def test_uncompressed_client_gets_every_frame_size_and_ticks_in_order(
        sim_url: str, admin: SimAdmin, account: dict[str, Any], tokens: dict[str, int]) -> None:
    # An aiohttp client offers no permessage-deflate, so frames take the direct socket write
    # (RFC 6455 framing done by the simulator): the 500-token quote snapshot (22 kB) needs the
    # 16-bit length form, the full one (92 kB) the 64-bit form, an LTP tick the short one.
    url = f"{ws_root(sim_url)}?api_key={account['api_key']}&access_token={account['access_token']}"
    parse = KiteTicker(account["api_key"], account["access_token"])._parse_binary
    wanted = sorted(tokens.values())[:500]
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:

        async def ticks() -> list[dict[str, Any]]:
            """Return the ticks of the next data frame (a bad frame closes the socket: fail)."""
            while True:
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT), msg
                if msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) > 1:
                    return parse(msg.data)

        await ws.send_str(orjson.dumps({"a": "subscribe", "v": wanted}).decode())
        await ws.send_str(orjson.dumps({"a": "mode", "v": ["full", wanted]}).decode())
        snapshot: dict[int, dict[str, Any]] = {}
        while len(snapshot) < len(wanted):
            snapshot.update({t["instrument_token"]: t for t in await ticks() if t["mode"] == "full"})
        assert set(snapshot) == set(wanted)
        assert all(t["last_price"] > 0 and len(t["depth"]["sell"]) == 5 for t in snapshot.values())
        await ws.send_str(orjson.dumps({"a": "mode", "v": ["ltp", [tokens["INFY"]]]}).decode())
        while not any(t["mode"] == "ltp" for t in await ticks()):
            pass  # the mode change's LTP snapshot comes first
        prices = [round(1500.05 + i / 20, 2) for i in range(50)]
        for price in prices:  # one request per tick: each frame is sent on its own
            admin.ticks(("INFY", price))
        seen: list[float] = []
        while len(seen) < len(prices):
            seen += [t["last_price"] for t in await ticks() if t["instrument_token"] == tokens["INFY"]]
        assert seen == prices
