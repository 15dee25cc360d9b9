"""The order path's own HTTP/1.1 transport against a raw server: keep-alive, re-sends, reply framings.

A POST is never sent twice (a dead keep-alive connection makes it a classified,
ambiguous error, for the tag lookup to settle); an idempotent GET/DELETE that
found its idle connection dead goes once more on a new one. Replies may come
gzipped or chunked. (test_executor_kite_transport.py proves the requests are the
official client's, byte for byte.)
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import orjson
import pytest

from libs.broker.kite import BrokerError, BrokerErrorKind
from libs.broker.kite_rest import KiteOrderClient

pytestmark = pytest.mark.timeout(30)
KEY, TOKEN = "apikey123", "token456"


class RawServer(asyncio.Protocol):
    """Answer each request with Kite's envelope; `drop_nth` requests on a connection are met with a close."""

    seen: list[tuple[int, bytes]]
    connections: int
    drop_nth: int | None = None
    framing = "length"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        type(self).connections += 1
        self.conn_id, self.count, self.buffer = type(self).connections, 0, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.count += 1
            type(self).seen.append((self.conn_id, head.split(b"\r\n")[0]))
            if self.count == type(self).drop_nth:
                self.transport.close()  # type: ignore[attr-defined]
                return
            self.reply()

    def reply(self) -> None:
        body = orjson.dumps({"status": "success", "data": [{"order_id": "1", "status": "COMPLETE"}]})
        headers = [b"HTTP/1.1 200 OK", b"Content-Type: application/json"]
        if type(self).framing == "gzip":
            body = gzip.compress(body)
            headers.append(b"Content-Encoding: gzip")
        if type(self).framing == "chunked":
            headers.append(b"Transfer-Encoding: chunked")
            half = len(body) // 2
            body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])) + b"0\r\n\r\n"
        else:
            headers.append(b"Content-Length: %d" % len(body))
        trailer = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n" if type(self).framing == "extra" else b""
        self.transport.write(b"\r\n".join(headers) + b"\r\n\r\n" + body + trailer)  # type: ignore[attr-defined]


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, type[RawServer]]]:
    handler = type("Handler", (RawServer,), {"seen": [], "connections": 0})
    srv = await asyncio.get_running_loop().create_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", handler
    srv.close()


async def test_keep_alive_reuses_one_connection(server: tuple[str, type[RawServer]]) -> None:
    root, handler = server
    client = KiteOrderClient(root, timeout_s=5)
    try:
        for framing in ("length", "gzip", "chunked"):
            handler.framing = framing
            assert await client.orders(KEY, TOKEN) == [{"order_id": "1", "status": "COMPLETE"}]
    finally:
        await client.aclose()
    assert handler.connections == 1 and len(handler.seen) == 3


async def test_a_connection_with_unsolicited_bytes_is_not_reused(server: tuple[str, type[RawServer]]) -> None:
    root, handler = server
    handler.framing = "extra"  # every reply is followed by a 408 nobody asked for
    client = KiteOrderClient(root, timeout_s=5)
    try:
        for _ in range(2):
            assert await client.orders(KEY, TOKEN) == [{"order_id": "1", "status": "COMPLETE"}]
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    assert handler.connections == 2


async def test_get_goes_again_on_a_dead_idle_connection_but_a_post_never(server: tuple[str, type[RawServer]]) -> None:
    root, handler = server
    handler.drop_nth = 2  # the second request on any connection finds it closed
    client = KiteOrderClient(root, timeout_s=5)
    try:
        await client.orders(KEY, TOKEN)
        assert await client.order_history(KEY, TOKEN, "1") == [{"order_id": "1", "status": "COMPLETE"}]
        assert [c for c, _ in handler.seen] == [1, 1, 2]  # re-sent once, on a new connection

        with pytest.raises(BrokerError) as raised:
            await client.place_market_order(KEY, TOKEN, symbol="INFY", exchange="NSE", transaction_type="BUY",
                                             quantity=1, product="MIS", tag="TWTEST")
    finally:
        await client.aclose()
    assert raised.value.kind == BrokerErrorKind.AMBIGUOUS  # the tag lookup decides; never a second POST
    posts = [line for _, line in handler.seen if line.startswith(b"POST")]
    assert posts == [b"POST /orders/regular HTTP/1.1"]


async def test_a_line_break_in_a_credential_is_refused_before_sending(server: tuple[str, type[RawServer]]) -> None:
    root, handler = server
    client = KiteOrderClient(root, timeout_s=5)
    try:
        with pytest.raises(BrokerError):
            await client.orders(KEY, "token\r\nX-Evil: 1")
    finally:
        await client.aclose()
    assert handler.seen == []


async def test_a_silent_broker_times_out(server: tuple[str, type[RawServer]]) -> None:
    root, handler = server
    handler.drop_nth = 99
    handler.reply = lambda self: None  # type: ignore[method-assign]  # reads, never answers
    client = KiteOrderClient(root, timeout_s=0.3)
    try:
        with pytest.raises(BrokerError) as raised:
            await client.place_market_order(KEY, TOKEN, symbol="INFY", exchange="NSE", transaction_type="BUY",
                                            quantity=1, product="MIS", tag="TWTEST")
    finally:
        await client.aclose()
    assert raised.value.kind == BrokerErrorKind.AMBIGUOUS and len(handler.seen) == 1
