"""The tick feed: Kite's ticker WebSocket read on the asyncio loop, decoded by kiteconnect's own parser.

The official KiteTicker runs Twisted's reactor in a thread of its own; every
tick then crossed to the loop with `call_soon_threadsafe`, and the two threads
convoyed on the GIL (a frame waited for the loop's switch interval). This feed
speaks the same protocol on the loop itself with aiohttp: the same URL, query
and headers as KiteTicker.connect, the same JSON subscribe / unsubscribe / mode
messages, pings as KiteTicker sends them (a connection that stops answering
is dropped), and binary frames decoded by `KiteTicker._parse_binary`, so a tick
is the same dict the official client hands its `on_ticks`. Heartbeat frames
(one byte) are not ticks.

It reconnects on its own with a capped back-off; a refused upgrade with 403
(Kite's answer to an expired access token) ends it in `token_expired`, since
retrying cannot help. `on_ticks` runs on the loop for each frame and must not
block.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
import structlog
from kiteconnect import KiteTicker

from libs.service.backoff import Backoff

# A lazy proxy: configure_logging() runs in main(), after this module is imported, and a
# bound logger made now would keep structlog's default (console) configuration.
log = structlog.get_logger("market_listener.feed")

TicksSink = Callable[[list[dict[str, Any]]], None]

CONNECTING, CONNECTED, DISCONNECTED, TOKEN_EXPIRED, CLOSED = (
    "connecting", "connected", "disconnected", "token_expired", "closed")

PING_INTERVAL_S = 2.5  # KiteTicker's; aiohttp drops the socket when a pong is not back within half of it
CONNECT_TIMEOUT_S = 30.0  # KiteTicker's
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.5, 5.0


class TickerFeed:
    """Own one ticker WebSocket at a time and keep it subscribed to the wanted tokens (LTP mode unless told)."""

    def __init__(self, api_key: str, access_token: str, root: str | None, on_ticks: TicksSink,
                 mode: str = "ltp") -> None:
        self.on_ticks = on_ticks
        self.mode = mode  # packet mode: "ltp" (the listener) or "quote" (the simulator's upstream)
        self.state = CONNECTING
        self.wanted: frozenset[int] = frozenset()
        self.connects = 0
        # Only its binary parser and user agent are used; it never connects.
        self._kite = KiteTicker(api_key, access_token, root=root)
        self._url = f"{self._kite.root}?{urlencode({'api_key': api_key, 'access_token': access_token})}"
        self._headers = {"X-Kite-Version": "3", "User-Agent": self._kite._user_agent()}
        self._subscribed: dict[int, str] = {}
        self._resync = asyncio.Event()
        self._connection: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # --- control (all on the loop) ----------------------------------------------------------------------

    def start(self) -> None:
        """Run the feed in a task of its own (for owners without a task group; close() ends it)."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="ticker-feed")

    def set_tokens(self, tokens: frozenset[int]) -> None:
        """Subscribe exactly these tokens (applied now, and again on every reconnect)."""
        self.wanted = tokens
        self._resync.set()

    def reconnect(self) -> None:
        """Drop the current socket and connect a fresh one at once."""
        if self._connection is not None:
            self._connection.cancel()

    def close(self) -> None:
        """Close the feed for good."""
        self.state = CLOSED
        for task in (self._connection, self._task):
            if task is not None:
                task.cancel()

    async def run(self) -> None:
        """Connect, read and reconnect until close() or an expired token."""
        backoff = Backoff(base=RECONNECT_FIRST_S, cap=RECONNECT_MAX_S)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as session:
            while self.state not in (CLOSED, TOKEN_EXPIRED):
                connects = self.connects
                connection = self._connection = asyncio.create_task(self._connect(session), name="ticker-socket")
                try:
                    await asyncio.wait({connection})
                finally:
                    if not connection.done():  # run() itself was cancelled
                        connection.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await connection
                if connection.cancelled():
                    backoff.reset()  # reconnect() asked for a fresh socket now
                    continue
                connection.result()  # a bug in the feed propagates to the owner
                if self.connects != connects:
                    backoff.reset()  # it was up: start the back-off afresh
                if self.state in (CLOSED, TOKEN_EXPIRED):
                    return
                await asyncio.sleep(backoff.next())

    # --- one connection ---------------------------------------------------------------------------------

    async def _connect(self, session: aiohttp.ClientSession) -> None:
        self.state = CONNECTING
        try:
            async with session.ws_connect(self._url, headers=self._headers, heartbeat=PING_INTERVAL_S * 2,
                                          autoping=True, max_msg_size=0) as ws:
                self.connects += 1
                self.state = CONNECTED
                log.info("ticker connected", connects=self.connects)
                self._subscribed = {}
                self._resync.set()
                subscriber = asyncio.create_task(self._keep_subscribed(ws), name="ticker-subscriptions")
                try:
                    await self._read(ws)
                finally:
                    subscriber.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await subscriber
                if self.state == CONNECTED:
                    self.state = DISCONNECTED
                    log.warning("ticker disconnected", code=ws.close_code, reason=str(ws.exception() or ""))
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 403:
                self._token_expired(exc.status, exc.message)
            else:
                self.state = DISCONNECTED
                log.warning("ticker connection refused", code=exc.status, reason=exc.message)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if self.state != CLOSED:
                self.state = DISCONNECTED
                log.warning("ticker connection failed", error=str(exc) or type(exc).__name__)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        parse, on_ticks = self._kite._parse_binary, self.on_ticks
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                if len(msg.data) > 4:  # 1 byte: Kite's heartbeat
                    on_ticks(parse(msg.data))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                self._text(msg.data)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                return

    def _text(self, data: str) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(message, dict) and message.get("type") == "error":
            reason = str(message.get("data"))
            if "403" in reason:
                self._token_expired(0, reason)
            else:
                log.warning("ticker error message", reason=reason)

    def _token_expired(self, code: int, reason: str) -> None:
        # Kite refuses the upgrade with 403 when the access token expired: retrying is futile.
        self.state = TOKEN_EXPIRED
        log.critical("market data token expired: no ticks, no stop-losses until a new token is set",
                     code=code, reason=reason)

    async def _keep_subscribed(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while not ws.closed:
            await self._resync.wait()
            self._resync.clear()
            current, wanted = self._subscribed, self.wanted
            add = sorted(t for t in wanted if t not in current)
            drop = sorted(t for t in current if t not in wanted)
            if add:
                await ws.send_str(_json({"a": "subscribe", "v": add}))
                await ws.send_str(_json({"a": "mode", "v": [self.mode, add]}))
                current.update(dict.fromkeys(add, self.mode))
            if drop:
                await ws.send_str(_json({"a": "unsubscribe", "v": drop}))
                for token in drop:
                    del current[token]
            if add or drop:
                log.info("ticker subscriptions changed", added=len(add), removed=len(drop), total=len(wanted))


def _json(message: dict[str, Any]) -> str:
    # KiteTicker sends its requests as text frames.
    return orjson.dumps(message).decode()
