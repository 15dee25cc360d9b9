"""The tick feed: the official KiteTicker on Twisted's reactor thread, bridged to asyncio.

Twisted is not thread-safe, so every call into the ticker (connect, subscribe,
close) goes through `reactor.callFromThread`. The reactor runs once per process
(it cannot be restarted), so a reconnect closes the old KiteTicker and connects
a new one on the same reactor; it is never stopped. Ticks are handed over by
the `on_ticks` callback given to the feed, which must not block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog
from kiteconnect import KiteTicker
from twisted.internet import reactor

# A lazy proxy: configure_logging() runs in main(), after this module is imported, and a
# bound logger made now would keep structlog's default (console) configuration.
log = structlog.get_logger("market_listener.feed")

TicksSink = Callable[[list[dict[str, Any]]], None]

CONNECTING, CONNECTED, DISCONNECTED, TOKEN_EXPIRED, CLOSED = (
    "connecting", "connected", "disconnected", "token_expired", "closed")


class TickerFeed:
    """Own one KiteTicker at a time and keep it subscribed to the wanted tokens (LTP mode unless told)."""

    def __init__(self, api_key: str, access_token: str, root: str | None, on_ticks: TicksSink,
                 mode: str = "ltp") -> None:
        self.api_key = api_key
        self.access_token = access_token
        self.root = root
        self.on_ticks = on_ticks
        self.mode = mode  # KiteTicker packet mode: "ltp" (the listener) or "quote" (the simulator's upstream)
        self.state = CONNECTING
        self.wanted: frozenset[int] = frozenset()
        self.connects = 0
        self._ticker: KiteTicker | None = None
        self._lock = threading.Lock()

    # --- called from the asyncio thread ---------------------------------------------------------------

    def start(self) -> None:
        """Connect; starts the reactor thread on first use."""
        if reactor.running:
            reactor.callFromThread(self._connect_new)
        else:
            self._connect_new()

    def set_tokens(self, tokens: frozenset[int]) -> None:
        """Subscribe exactly these tokens (applied now, and again on every reconnect)."""
        self.wanted = tokens
        reactor.callFromThread(self._sync_subscriptions)

    def reconnect(self) -> None:
        """Drop the current ticker and connect a fresh one."""
        reactor.callFromThread(self._reconnect)

    def close(self) -> None:
        """Close the ticker for good (the reactor thread is a daemon and dies with the process)."""
        self.state = CLOSED
        if reactor.running:
            reactor.callFromThread(self._close_current)

    # --- reactor thread -------------------------------------------------------------------------------

    def _connect_new(self) -> None:
        ticker = KiteTicker(self.api_key, self.access_token, root=self.root, reconnect=True,
                            reconnect_max_tries=300, reconnect_max_delay=5)
        ticker.on_ticks = self._on_ticks
        ticker.on_connect = self._on_connect
        ticker.on_close = self._on_close
        ticker.on_error = self._on_error
        self._ticker = ticker
        self.state = CONNECTING
        ticker.connect(threaded=True)

    def _reconnect(self) -> None:
        self._close_current()
        if self.state != CLOSED:
            self._connect_new()

    def _close_current(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.on_ticks = ticker.on_close = ticker.on_error = ticker.on_connect = None
            ticker.close()

    def _on_ticks(self, ws: KiteTicker, ticks: list[dict[str, Any]]) -> None:
        if ws is self._ticker:
            self.on_ticks(ticks)

    def _on_connect(self, ws: KiteTicker, _response: Any) -> None:
        if ws is not self._ticker:
            return
        self.connects += 1
        self.state = CONNECTED
        log.info("ticker connected", connects=self.connects)
        # KiteTicker resubscribes its own tokens on reconnect; this covers a fresh ticker.
        reactor.callLater(0, self._sync_subscriptions)

    def _on_close(self, ws: KiteTicker, code: Any, reason: Any) -> None:
        if ws is self._ticker and self.state not in (TOKEN_EXPIRED, CLOSED):
            self.state = DISCONNECTED
            log.warning("ticker disconnected", code=code, reason=str(reason))

    def _on_error(self, ws: KiteTicker, code: Any, reason: Any) -> None:
        if ws is not self._ticker:
            return
        if "403" in str(reason):
            # Kite refuses the upgrade with 403 when the access token expired: retrying is futile.
            self.state = TOKEN_EXPIRED
            log.critical("market data token expired: no ticks, no stop-losses until a new token is set",
                         code=code, reason=str(reason))
            ws.stop_retry()

    def _sync_subscriptions(self) -> None:
        ticker = self._ticker
        if ticker is None or not ticker.is_connected():
            return
        current = set(ticker.subscribed_tokens)
        wanted = self.wanted
        add = sorted(wanted - current)
        drop = sorted(current - wanted)
        if add:
            ticker.subscribe(add)
            ticker.set_mode(self.mode, add)
        if drop:
            ticker.unsubscribe(drop)
        if add or drop:
            log.info("ticker subscriptions changed", added=len(add), removed=len(drop), total=len(wanted))
