"""Paper trading on live prices: mirror an upstream KiteTicker into the simulated market.

With upstream credentials (a real Kite account's api_key and access_token,
or another simulator's) the simulator subscribes every instrument it lists,
in quote mode, and every upstream tick sets the local last price, OHLC and
volume; the random walk stays off. Local orders then fill, and local ticker
clients receive ticks, at the market's real prices.

KiteTicker runs on Twisted's reactor in a daemon thread (one reactor per
process, never restarted); ticks cross to the asyncio loop with
`call_soon_threadsafe`, and every call into the ticker goes through
`reactor.callFromThread`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from services.kite_sim.market import Instrument, Market

if TYPE_CHECKING:
    from kiteconnect import KiteTicker

log = structlog.get_logger("kite_sim.upstream")

CONNECTING, CONNECTED, DISCONNECTED, TOKEN_EXPIRED, CLOSED = (
    "connecting", "connected", "disconnected", "token_expired", "closed")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Where live prices come from."""

    api_key: str
    access_token: str
    ws_url: str | None = None
    """KiteTicker root; None means Kite's own (wss://ws.kite.trade)."""


def paise(rupees: Any) -> int:
    """Convert a tick's rupee price to paise (0 when absent)."""
    return round(float(rupees or 0) * 100)


def tick_rows(ticks: Iterable[dict[str, Any]], by_token: dict[int, Instrument]
              ) -> list[tuple[Instrument, int, int, int, int, int, int, int, int]]:
    """Turn KiteTicker tick dicts into `Market.set_external` rows, skipping unknown tokens."""
    rows = []
    for t in ticks:
        ins = by_token.get(t.get("instrument_token", 0))
        last = paise(t.get("last_price"))
        if ins is None or last <= 0:
            continue
        ohlc = t.get("ohlc") or {}
        rows.append((ins, last, paise(ohlc.get("open")), paise(ohlc.get("high")), paise(ohlc.get("low")),
                     paise(ohlc.get("close")), int(t.get("volume_traded") or 0),
                     int(t.get("last_traded_quantity") or 0), paise(t.get("average_traded_price"))))
    return rows


class UpstreamFeed:
    """Own one KiteTicker subscribed to every local instrument; apply its ticks on the loop."""

    def __init__(self, config: UpstreamConfig, market: Market) -> None:
        self.config = config
        self.market = market
        self.loop: asyncio.AbstractEventLoop | None = None
        self.state = CONNECTING
        self.ticks = 0
        self.connects = 0
        self._ticker: KiteTicker | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect (starting the reactor thread on first use); ticks are applied on `loop`."""
        from twisted.internet import reactor  # imported on use: most simulators run without upstream

        self.loop = loop
        if reactor.running:
            reactor.callFromThread(self._connect)
        else:
            self._connect()
        log.info("upstream feed starting", ws_url=self.config.ws_url or "kite", instruments=len(self.market.by_token))

    def close(self) -> None:
        """Stop for good."""
        from twisted.internet import reactor

        self.state = CLOSED
        if reactor.running:
            reactor.callFromThread(self._close)

    def apply(self, ticks: list[dict[str, Any]]) -> None:
        """Set local prices from upstream ticks (on the asyncio loop)."""
        rows = tick_rows(ticks, self.market.by_token)
        if rows:
            self.ticks += len(rows)
            self.market.set_external(rows)

    # --- reactor thread -------------------------------------------------------------------------------

    def _connect(self) -> None:
        from kiteconnect import KiteTicker

        ticker = KiteTicker(self.config.api_key, self.config.access_token, root=self.config.ws_url,
                            reconnect=True, reconnect_max_tries=300, reconnect_max_delay=5)
        ticker.on_ticks = self._on_ticks
        ticker.on_connect = self._on_connect
        ticker.on_close = self._on_close
        ticker.on_error = self._on_error
        self._ticker = ticker
        ticker.connect(threaded=True)

    def _close(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.on_ticks = ticker.on_close = ticker.on_error = ticker.on_connect = None
            ticker.close()

    def _on_ticks(self, ws: KiteTicker, ticks: list[dict[str, Any]]) -> None:
        if ws is self._ticker and self.state != CLOSED and self.loop is not None:
            self.loop.call_soon_threadsafe(self.apply, ticks)

    def _on_connect(self, ws: KiteTicker, _response: Any) -> None:
        if ws is not self._ticker:
            return
        self.connects += 1
        self.state = CONNECTED
        tokens = sorted(self.market.by_token)
        ws.subscribe(tokens)
        ws.set_mode(ws.MODE_QUOTE, tokens)
        log.info("upstream feed connected", connects=self.connects, subscribed=len(tokens))

    def _on_close(self, ws: KiteTicker, code: Any, reason: Any) -> None:
        if ws is self._ticker and self.state not in (TOKEN_EXPIRED, CLOSED):
            self.state = DISCONNECTED
            log.warning("upstream feed disconnected", code=code, reason=str(reason))

    def _on_error(self, ws: KiteTicker, code: Any, reason: Any) -> None:
        if ws is self._ticker and "403" in str(reason):
            # A refused upgrade means the upstream token expired: retrying cannot help.
            self.state = TOKEN_EXPIRED
            log.critical("upstream token refused: prices are frozen until restarted with a fresh token",
                         code=code, reason=str(reason))
            ws.stop_retry()
