"""The dashboard's event stream: pushed without polling, authenticated by a ticket, one user's data only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.e2e.harness import Stack, Trader
from tests.support.eventually import eventually


class EventStream:
    """One open `GET /api/v1/stream`, its events collected as they arrive."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[tuple[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        name, data = "message", []
        async for raw in self.response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                self.events.append((name, json.loads("\n".join(data))))
                name, data = "message", []

    async def wait_for(self, predicate: Any, timeout: float = 20) -> tuple[str, Any]:
        def matching() -> tuple[str, Any] | None:
            return next((event for event in self.events if predicate(*event)), None)

        try:
            return await eventually(matching, timeout=timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(f"no matching event in {[name for name, _ in self.events]}") from None

    def text(self) -> str:
        return json.dumps(self.events)

    async def close(self) -> None:
        self.reader.cancel()
        self.response.close()


async def open_stream(trader: Trader, http: aiohttp.ClientSession) -> EventStream:
    ticket = await trader.call("POST", "/stream/ticket")
    assert ticket["expires_in"] == 60
    response = await http.get(trader.stack.api_url + ticket["url"], timeout=aiohttp.ClientTimeout(total=None))
    assert response.status == 200 and response.content_type == "text/event-stream"
    return EventStream(response)


@pytest.fixture
async def other(e2e_stack: Stack, http: aiohttp.ClientSession) -> Trader:
    return await Trader(http, e2e_stack).sign_up()


@pytest.fixture
async def streams() -> AsyncIterator[list[EventStream]]:
    opened: list[EventStream] = []
    yield opened
    for stream in opened:
        await stream.close()


@pytest.mark.timeout(60)
async def test_stream_pushes_fills_and_prices_and_never_another_users_data(
        trader: Trader, other: Trader, http: aiohttp.ClientSession, streams: list[EventStream]) -> None:
    mine = await open_stream(trader, http)
    theirs = await open_stream(other, http)
    streams += [mine, theirs]
    await other.strategy("MARUTI", buy_in_s=240, sell_in_s=300, stop_loss=10000, quantity=1, start=False)
    await trader.tick("WIPRO", 290)
    sid = await trader.strategy("WIPRO", buy_in_s=2, sell_in_s=300, stop_loss=280, quantity=4)

    def bought(name: str, data: Any) -> bool:
        return name == "strategies" and any(s["id"] == sid and s["position"] == "bought"
                                            and s["entry_average_price"] for s in data)

    await mine.wait_for(bought)
    await mine.wait_for(lambda name, data: name == "orders" and any(
        o["strategy_id"] == sid and o["event_type"] == "BUY" and o["status"] == "success" for o in data))
    # The price moves (the paper market walks, and we push a tick): each move is pushed with its open P&L.
    await trader.tick("WIPRO", 293.5)

    def marked(name: str, data: Any) -> bool:
        return name == "strategies" and any(
            s["id"] == sid and s["position"] == "bought" and s["last_price"] is not None
            and s["entry_average_price"] is not None and s["unrealized_pnl"] == round(
                (s["last_price"] - s["entry_average_price"]) * 4, 2) for s in data)

    await mine.wait_for(marked)
    await eventually(lambda: len({s["last_price"] for name, data in mine.events if name == "strategies"
                                  for s in data if s["id"] == sid and s["position"] == "bought"}) >= 2,
                     timeout=20, interval=0.1)
    await trader.call("POST", "/strategies/stop", {"strategy_id": sid, "square_off": True})

    # The other user's stream carried their own strategy and nothing of this trader's.
    await theirs.wait_for(lambda name, data: name == "strategies" and [s["symbol"] for s in data] == ["MARUTI"])
    assert sid not in theirs.text() and "WIPRO" not in theirs.text()
    assert not [data for name, data in theirs.events if name == "orders"]
    assert "MARUTI" not in mine.text()


async def test_stream_needs_a_valid_ticket_not_a_bearer_token(trader: Trader, http: aiohttp.ClientSession) -> None:
    for ticket in ("", "nonsense", trader.token):
        async with http.get(f"{trader.stack.api_url}/api/v1/stream?ticket={ticket}") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_ticket"
    ticket = (await trader.call("POST", "/stream/ticket"))["ticket"]
    async with http.get(f"{trader.stack.api_url}/api/v1/me", headers={"Authorization": f"Bearer {ticket}"}) as resp:
        assert resp.status == 401
    async with http.post(f"{trader.stack.api_url}/api/v1/stream/ticket") as resp:
        assert resp.status == 401
