"""Kite's binary tick format and the WebSocket fan-out.

Frame: 2-byte packet count, then per packet a 2-byte length and the packet,
all big-endian. Packets: LTP 8 bytes, quote 44, full 184; prices in paise.
A 1-byte frame is a heartbeat. Each changed quote is encoded once per mode
per tick and the bytes are shared by every connection that wants them.
Every connection has its own send queue and writer task, so a slow client
delays nobody else; if it falls far behind, its oldest frames are dropped.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from services.kite_sim.depth import BUY, LEVELS, SELL, Liquidity
from services.kite_sim.market import Market, Quote

MODE_LTP, MODE_QUOTE, MODE_FULL = "ltp", "quote", "full"
MODES = (MODE_LTP, MODE_QUOTE, MODE_FULL)
HEARTBEAT = b"\x00"
MAX_QUEUED_FRAMES = 1024
MAX_TOKENS_PER_CONNECTION = 3000  # Kite's per-connection subscription limit

_LTP = struct.Struct(">II")
_QUOTE = struct.Struct(">11I")
_FULL_HEAD = struct.Struct(">16I")
_DEPTH10 = struct.Struct(">" + "IIHxx" * 10)  # quantity, price, orders; five bids then five asks
_U16 = struct.Struct(">H")


def encode_ltp(q: Quote, _liquidity: Liquidity | None = None) -> bytes:
    """Encode an 8-byte LTP packet."""
    return _LTP.pack(q.instrument.instrument_token, q.last)


def encode_quote(q: Quote, liquidity: Liquidity) -> bytes:
    """Encode a 44-byte quote packet; the side totals are the book's average levels, LEVELS x depth_quantity."""
    side = LEVELS * liquidity.depth_quantity
    return _QUOTE.pack(q.instrument.instrument_token, q.last, q.last_qty, q.average_paise(), q.volume,
                       side, side, q.open, q.high, q.low, q.close)


def encode_full(q: Quote, liquidity: Liquidity) -> bytes:
    """Encode a 184-byte full packet: quote fields, trade and exchange times, OI (0), and the book's depth.

    The depth is what matching would fill against now (`Liquidity.levels`):
    bids are what a SELL takes, asks what a BUY takes; empty levels are zeros.
    """
    ts = int(q.updated_at)
    side = LEVELS * liquidity.depth_quantity
    head = _FULL_HEAD.pack(q.instrument.instrument_token, q.last, q.last_qty, q.average_paise(), q.volume,
                           side, side, q.open, q.high, q.low, q.close, ts, 0, 0, 0, ts)
    values: list[int] = []
    for taker in (SELL, BUY):
        levels = list(liquidity.levels(q, taker))
        for level in levels:
            values += (level.quantity, level.price, 1)
        values += (0, 0, 0) * (LEVELS - len(levels))
    return head + _DEPTH10.pack(*values)


ENCODERS = {MODE_LTP: encode_ltp, MODE_QUOTE: encode_quote, MODE_FULL: encode_full}


def frame(packets: list[bytes]) -> bytes:
    """Join packets into one Kite binary frame."""
    parts = [_U16.pack(len(packets))]
    for p in packets:
        parts.append(_U16.pack(len(p)))
        parts.append(p)
    return b"".join(parts)


@dataclass(eq=False)
class TickConnection:
    """One ticker WebSocket: its subscriptions and its outgoing queue."""

    ws: web.WebSocketResponse
    api_key: str
    # asyncio's or uvloop's transport: uvloop's are not asyncio.Transport subclasses, so
    # it is used by what it does (write, abort), never checked with isinstance.
    transport: Any = None
    modes: dict[int, str] = field(default_factory=dict)
    queue: asyncio.Queue[bytes | str] = field(default_factory=lambda: asyncio.Queue(MAX_QUEUED_FRAMES))
    dropped: int = 0

    def enqueue(self, data: bytes) -> None:
        """Queue a frame; drop the oldest one if the client is far behind."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(data)

    def enqueue_text(self, text: str) -> None:
        """Queue a text message (errors, as Kite sends them)."""
        if not self.queue.full():
            self.queue.put_nowait(text)

    async def write_forever(self) -> None:
        """Send queued frames in order until the socket closes."""
        while True:
            data = await self.queue.get()
            if self.ws.closed:
                return
            if isinstance(data, str):
                await self.ws.send_str(data)
            else:
                await self.ws.send_bytes(data)


class TickHub:
    """Track subscriptions and push ticks to every interested connection."""

    def __init__(self, market: Market, liquidity: Liquidity) -> None:
        self.market = market
        self.liquidity = liquidity  # the book's depth, shown in quote totals and full packets
        self.connections: set[TickConnection] = set()
        self.subscribers: dict[int, dict[TickConnection, str]] = {}
        self.frames_sent = 0
        market.listeners.append(self.publish)

    def attach(self, conn: TickConnection) -> None:
        """Register a new connection."""
        self.connections.add(conn)

    def detach(self, conn: TickConnection) -> None:
        """Forget a connection and its subscriptions."""
        self.connections.discard(conn)
        for token in conn.modes:
            subs = self.subscribers.get(token)
            if subs is not None:
                subs.pop(conn, None)
                if not subs:
                    del self.subscribers[token]
        conn.modes.clear()

    def subscribe(self, conn: TickConnection, tokens: Iterable[int], mode: str = MODE_QUOTE) -> None:
        """Subscribe known tokens (default mode quote, as Kite) and send a snapshot."""
        fresh = []
        for token in tokens:
            if token not in self.market.by_token or token in conn.modes:
                continue
            if len(conn.modes) >= MAX_TOKENS_PER_CONNECTION:
                break
            conn.modes[token] = mode
            self.subscribers.setdefault(token, {})[conn] = mode
            fresh.append(token)
        self._snapshot(conn, fresh)

    def unsubscribe(self, conn: TickConnection, tokens: Iterable[int]) -> None:
        """Stop sending ticks of these tokens to the connection."""
        for token in tokens:
            if conn.modes.pop(token, None) is None:
                continue
            subs = self.subscribers.get(token)
            if subs is not None:
                subs.pop(conn, None)
                if not subs:
                    del self.subscribers[token]

    def set_mode(self, conn: TickConnection, mode: str, tokens: Iterable[int]) -> None:
        """Change the packet mode of subscribed tokens and send a snapshot in it."""
        changed = []
        for token in tokens:
            if token in conn.modes:
                conn.modes[token] = mode
                self.subscribers[token][conn] = mode
                changed.append(token)
        self._snapshot(conn, changed)

    def publish(self, quotes: list[Quote]) -> None:
        """Send one frame per connection holding every changed quote it subscribes to."""
        if not self.subscribers:
            return
        per_conn: dict[TickConnection, list[bytes]] = {}
        for q in quotes:
            subs = self.subscribers.get(q.instrument.instrument_token)
            if not subs:
                continue
            encoded: dict[str, bytes] = {}
            for conn, mode in subs.items():
                packet = encoded.get(mode)
                if packet is None:
                    packet = encoded[mode] = ENCODERS[mode](q, self.liquidity)
                per_conn.setdefault(conn, []).append(packet)
        for conn, packets in per_conn.items():
            conn.enqueue(frame(packets))
        self.frames_sent += len(per_conn)

    def heartbeat(self) -> None:
        """Send the 1-byte heartbeat to every connection."""
        for conn in self.connections:
            conn.enqueue(HEARTBEAT)

    async def run_heartbeat(self, interval_s: float = 1.0) -> None:
        """Beat forever, as Kite does once a second."""
        while True:
            await asyncio.sleep(interval_s)
            self.heartbeat()

    async def close_all(self, api_key: str | None = None, abort: bool = False) -> int:
        """Close ticker connections (all, or one account's); return how many."""
        targets = [c for c in self.connections if api_key is None or c.api_key == api_key]
        for conn in targets:
            self.detach(conn)
            if abort and conn.transport is not None:
                # Abort mimics a dropped network link: no close handshake at all.
                conn.transport.abort()
            else:
                await conn.ws.close(code=1001, message=b"closed by simulator")
        return len(targets)

    def _snapshot(self, conn: TickConnection, tokens: list[int]) -> None:
        # Kite answers a subscription with the current state right away.
        if not tokens:
            return
        packets = [ENCODERS[conn.modes[t]](self.market.quotes[t], self.liquidity) for t in tokens]
        for start in range(0, len(packets), 500):
            conn.enqueue(frame(packets[start:start + 500]))


def make_ticker_handler(hub: TickHub, authenticate: Callable[[str, str], object | None]
                        ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Build the `/ws?api_key=..&access_token=..` handler."""

    async def ticker(request: web.Request) -> web.StreamResponse:
        """Stream ticks to one KiteTicker client."""
        api_key = request.query.get("api_key", "")
        if authenticate(api_key, request.query.get("access_token", "")) is None:
            # Refuse the upgrade itself, as Kite does for a bad or expired token.
            raise web.HTTPForbidden(text="invalid api_key or access_token")
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        conn = TickConnection(ws, api_key, request.transport)
        hub.attach(conn)
        writer = asyncio.create_task(conn.write_forever())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    error = apply_ticker_message(hub, conn, msg.data)
                    if error:
                        conn.enqueue_text(orjson.dumps({"type": "error", "data": error}).decode())
        finally:
            hub.detach(conn)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        return ws

    return ticker


def apply_ticker_message(hub: TickHub, conn: TickConnection, text: str) -> str | None:
    """Apply a subscribe/unsubscribe/mode message; return an error text if it is bad."""
    try:
        message = orjson.loads(text)
        action, value = message["a"], message["v"]
        if action == "subscribe":
            hub.subscribe(conn, [int(t) for t in value])
        elif action == "unsubscribe":
            hub.unsubscribe(conn, [int(t) for t in value])
        elif action == "mode":
            mode, tokens = value
            if mode not in MODES:
                return f"invalid mode: {mode}"
            hub.set_mode(conn, mode, [int(t) for t in tokens])
        else:
            return f"unknown action: {action}"
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return "malformed message"
    return None


def send_text_to_account(hub: TickHub, api_key: str, text: str) -> int:
    """Queue a text message (an order update) on every ticker connection of one account; return how many.

    Unlike ticks, a text message is never the one dropped: if a connection is
    far behind, its oldest queued frame makes room.
    """
    sent = 0
    for conn in hub.connections:
        if conn.api_key != api_key:
            continue
        if conn.queue.full():
            conn.queue.get_nowait()
            conn.dropped += 1
        conn.queue.put_nowait(text)
        sent += 1
    return sent


def has_connection(hub: TickHub, api_key: str) -> bool:
    """Tell whether the account has a ticker connection open."""
    return any(conn.api_key == api_key for conn in hub.connections)
