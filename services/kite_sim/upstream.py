"""Paper trading on live prices: mirror an upstream KiteTicker into the simulated market.

With upstream credentials (a real Kite account's api_key and access_token,
or another simulator's) the simulator subscribes every instrument it lists,
in quote mode, and every upstream tick sets the local last price, OHLC and
volume; the random walk stays off. Local orders then fill, and local ticker
clients receive ticks, at the market's real prices.

The ticker is the market listener's `TickerFeed` in quote mode: Kite's ticker
WebSocket read on the simulator's loop, reconnecting on its own, giving up
(state `token_expired`) when the upstream refuses the token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from services.kite_sim.market import Instrument, Market

if TYPE_CHECKING:
    from services.market_listener.feed import TickerFeed

log = structlog.get_logger("kite_sim.upstream")

CONNECTING, CONNECTED, CLOSED = "connecting", "connected", "closed"  # TickerFeed's states


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Where live prices come from (the credentials stay out of its repr)."""

    api_key: str = field(repr=False)
    access_token: str = field(repr=False)
    ws_url: str | None = None
    """KiteTicker root; None means Kite's own (wss://ws.kite.trade)."""
    root: str | None = None
    """Kite REST root (e.g. https://api.kite.trade) to serve `historical_data` from; None generates candles."""


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
    """Keep one upstream ticker (the market listener's `TickerFeed`) on every local instrument."""

    def __init__(self, config: UpstreamConfig, market: Market) -> None:
        self.config = config
        self.market = market
        self.ticks = 0
        self._feed: TickerFeed | None = None

    @property
    def state(self) -> str:
        """Return the ticker's state: connecting, connected, disconnected, token_expired or closed."""
        return self._feed.state if self._feed is not None else CONNECTING

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect; ticks are applied on `loop`."""
        # Imported on use: the ticker costs start-up time most simulators never need.
        from services.market_listener.feed import TickerFeed

        def hand_over(ticks: list[dict[str, Any]]) -> None:
            loop.call_soon_threadsafe(self.apply, ticks)

        self._feed = TickerFeed(self.config.api_key, self.config.access_token, self.config.ws_url, hand_over,
                                mode="quote")
        self._feed.start()
        self._feed.set_tokens(frozenset(self.market.by_token))
        log.info("upstream feed starting", ws_url=self.config.ws_url or "kite", instruments=len(self.market.by_token))

    def close(self) -> None:
        """Stop for good."""
        if self._feed is not None:
            self._feed.close()

    def apply(self, ticks: list[dict[str, Any]]) -> None:
        """Set local prices from upstream ticks (on the asyncio loop)."""
        if self._feed is None or self._feed.state == CLOSED:
            return
        rows = tick_rows(ticks, self.market.by_token)
        if rows:
            self.ticks += len(rows)
            self.market.set_external(rows)


class UpstreamHistory:
    """Answer historical-data requests from the upstream's REST API, passing its answer (or error) through.

    In upstream mode the prices the simulator ticks are the upstream's, so the
    upstream's candles are the ones consistent with them.
    """

    def __init__(self, config: UpstreamConfig, timeout_s: float = 10.0) -> None:
        assert config.root is not None
        self.config = config
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def candles(self, token: int, interval: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Return (HTTP status, Kite envelope) of the upstream's historical route."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        url = f"{self.config.root.rstrip('/')}/instruments/historical/{token}/{interval}"  # type: ignore[union-attr]
        headers = {"X-Kite-Version": "3", "Authorization": f"token {self.config.api_key}:{self.config.access_token}"}
        async with self._session.get(url, params=query, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
