"""The executor's asyncio Kite client sends what the official client sends, byte for byte.

Both clients talk to the simulator through a recording proxy (a real aiohttp
server that forwards each request and keeps method, path, query, headers and
body), run the same calls, and the recorded requests must be identical; the
replies must come back as the same data or the same classified error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kiteconnect import KiteConnect

from libs.broker.kite import BrokerError, BrokerErrorKind, classify
from libs.broker.kite_rest import KiteOrderClient
from tests.support.kite_sim import SimAdmin

pytestmark = pytest.mark.timeout(60)

# Hop-by-hop or connection-specific: may differ without changing the request.
_TRANSPORT_HEADERS = {"host"}


class RecordingProxy:
    """Forward every request to the simulator and record it."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen: list[dict[str, Any]] = []

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append({"method": request.method, "path": request.path, "query": request.query_string,
                          "headers": {k.lower(): v for k, v in request.headers.items()
                                      if k.lower() not in _TRANSPORT_HEADERS},
                          "body": body})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with aiohttp.ClientSession(auto_decompress=False) as session, \
                session.request(request.method, self.target + request.path_qs, data=body or None,
                                headers=headers) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type=resp.content_type)


@pytest.fixture
async def proxy(sim: SimAdmin) -> AsyncIterator[tuple[str, RecordingProxy]]:
    recorder = RecordingProxy(sim.base_url)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", recorder
    await runner.cleanup()


async def official(fn: Any) -> tuple[str, Any]:
    """Run a blocking official-client call; return ("ok", data) or ("error", classified kind/type/code)."""
    try:
        return "ok", await asyncio.to_thread(fn)
    except Exception as exc:  # noqa: BLE001 - compared below
        error = classify(exc, sent_order=True)
        return "error", (error.kind, error.error_type, error.code)


async def ours(coro: Any) -> tuple[str, Any]:
    try:
        return "ok", await coro
    except BrokerError as error:
        return "error", (error.kind, error.error_type, error.code)


def strip_times(data: Any) -> Any:
    """Drop fields that differ between two orders placed a moment apart."""
    drop = {"order_id", "exchange_order_id", "order_timestamp", "exchange_timestamp", "exchange_update_timestamp",
            "average_price", "price", "guid"}
    if isinstance(data, list):
        return [strip_times(d) for d in data]
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k not in drop}
    return data


async def test_async_client_sends_the_official_clients_requests(sim: SimAdmin, proxy: tuple[str, RecordingProxy]) -> None:
    root, recorder = proxy
    acct = sim.create_account("transport")
    kite = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=root)
    client = KiteOrderClient(root, timeout_s=5)
    key, token = acct["api_key"], acct["access_token"]
    try:
        # (official call, our call): place, order book, history, a refused cancel, a 429.
        their_id = await official(lambda: kite.place_order(
            variety=kite.VARIETY_REGULAR, exchange="NSE", tradingsymbol="INFY", transaction_type="BUY", quantity=3,
            product="MIS", order_type=kite.ORDER_TYPE_MARKET, tag="TWETRANSPORTTEST0001", market_protection=-1))
        our_id = await ours(client.place_market_order(key, token, symbol="INFY", exchange="NSE",
                                                      transaction_type="BUY", quantity=3, product="MIS",
                                                      tag="TWETRANSPORTTEST0001"))
        assert their_id[0] == our_id[0] == "ok"
        pairs = [
            (lambda: kite._get("orders"), client.orders(key, token)),
            (lambda: kite._get("order.info", url_args={"order_id": their_id[1]}),
             client.order_history(key, token, their_id[1])),
            (lambda: kite.cancel_order(kite.VARIETY_REGULAR, their_id[1]),
             client.cancel_order(key, token, their_id[1])),
        ]
        replies = []
        for theirs_fn, our_coro in pairs:
            replies.append((await official(theirs_fn), await ours(our_coro)))
        sim.set_faults(burst_429=2, routes=["orders"])
        replies.append((await official(lambda: kite._get("orders")), await ours(client.orders(key, token))))
    finally:
        await client.aclose()
        kite.reqsession.close()

    seen = recorder.seen
    assert len(seen) == 10
    for theirs, mine in zip(seen[::2], seen[1::2], strict=True):
        assert mine == theirs
    place = seen[0]
    assert place["method"] == "POST" and place["path"] == "/orders/regular"
    assert place["headers"]["x-kite-version"] == KiteConnect.kite_header_version
    assert place["headers"]["authorization"] == f"token {key}:{token}"
    assert place["headers"]["user-agent"].lower().startswith("kiteconnect-python/")
    assert place["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert b"tag=TWETRANSPORTTEST0001" in place["body"] and b"market_protection=-1" in place["body"]

    book, history, cancel, throttled = replies
    assert strip_times(book[0][1]) == strip_times(book[1][1]) and len(book[1][1]) == 2
    assert [h["status"] for h in history[1][1]] == [h["status"] for h in history[0][1]]
    assert history[1][1][-1]["status"] == "COMPLETE"
    # A filled order cannot be cancelled: both get Kite's InputException, classified alike.
    assert cancel[0] == cancel[1] == ("error", (BrokerErrorKind.FINAL, "InputException", 400))
    assert throttled[0] == throttled[1] == ("error", (BrokerErrorKind.RETRYABLE, "NetworkException", 429))
