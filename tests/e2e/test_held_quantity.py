"""Orders that end after a partial fill: every exit sells exactly the shares held, each share once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kiteconnect import KiteConnect

from tests.e2e.harness import Trader
from tests.support.eventually import eventually

QUANTITY = 8
# Five depth levels of one share a side, and the exchange cancels what a MARKET order
# cannot take from them at once: a MARKET order of 8 fills 5 and ends CANCELLED.
THIN = {"depth_quantity": 1, "cancel_unfilled_market": True}
THIN_FILL = 5


@pytest.fixture
async def liquidity(trader: Trader) -> AsyncIterator[dict[str, Any]]:
    """Hand the test the start-up liquidity settings, and put them back afterwards."""
    before = await trader.sim("GET", "liquidity")
    yield before
    await trader.sim("POST", "liquidity", before)


def _orders(orders: list[dict[str, Any]]) -> list[tuple[str, int, str, int]]:
    return [(o["transaction_type"], o["quantity"], o["status"], o["filled_quantity"]) for o in orders]


async def _net_quantity(trader: Trader, symbol: str) -> int:
    kite = KiteConnect(trader.account["api_key"], access_token=trader.account["access_token"],
                       root=trader.stack.sim_url, timeout=5)
    net = (await asyncio.to_thread(kite.positions))["net"]
    return sum(p["quantity"] for p in net if p["tradingsymbol"] == symbol)


async def _events(trader: Trader, sid: str) -> list[dict[str, Any]]:
    return list(reversed(await trader.logs(sid)))


@pytest.mark.parametrize("exit_by", ["stoploss", "square_off"])
async def test_an_entry_cancelled_after_a_partial_fill_exits_exactly_what_filled(
        trader: Trader, liquidity: dict[str, Any], exit_by: str) -> None:
    symbol = "TCS" if exit_by == "stoploss" else "WIPRO"
    await trader.tick(symbol, 500)
    await trader.sim("POST", "liquidity", THIN)
    sid = await trader.strategy(symbol, buy_in_s=2, sell_in_s=60, stop_loss=480, quantity=QUANTITY)

    async def bought() -> bool:
        return (await trader.status(sid))["position"] == "bought"

    await eventually(bought, timeout=15, interval=0.1, message="the partly filled entry was not held")
    if exit_by == "stoploss":
        await trader.tick(symbol, 470)  # a fresh book: five bids of one share
    else:
        await trader.tick(symbol, 500)
        await trader.call("POST", "/strategies/stop", {"strategy_id": sid, "square_off": True})

    async def sold() -> list[dict[str, Any]]:
        orders = await trader.broker_orders()
        return orders if len(orders) == 2 and orders[1]["status"] == "COMPLETE" else []

    orders = await eventually(sold, timeout=15, interval=0.1, message="the held shares were not sold")
    await asyncio.sleep(0.5)  # let a wrongly placed second exit arrive before counting
    orders = await trader.broker_orders()
    assert _orders(orders) == [("BUY", QUANTITY, "CANCELLED", THIN_FILL), ("SELL", THIN_FILL, "COMPLETE", THIN_FILL)]
    assert await _net_quantity(trader, symbol) == 0  # no short sale of the unfilled part
    rows = await eventually(lambda: _rows_of(trader, sid, 2), timeout=10, interval=0.2)
    entry = rows[0]["response_payload"]
    assert (rows[0]["event_type"], rows[0]["status"]) == ("BUY", "success")
    assert (entry["partial_fill"], entry["requested_quantity"], entry["filled_quantity"]) == (
        True, QUANTITY, THIN_FILL)
    assert rows[1]["event_type"] == ("STOPLOSS" if exit_by == "stoploss" else "SELL")
    assert rows[1]["status"] == "success"


async def _rows_of(trader: Trader, sid: str, count: int) -> list[dict[str, Any]]:
    rows = await _events(trader, sid)
    return rows if len(rows) >= count else []


async def test_an_exit_cancelled_after_a_partial_fill_sells_the_remainder_once(
        trader: Trader, liquidity: dict[str, Any]) -> None:
    await trader.tick("AXISBANK", 1000)
    sid = await trader.strategy("AXISBANK", buy_in_s=2, sell_in_s=5, stop_loss=900, quantity=QUANTITY)

    async def bought() -> bool:
        return (await trader.status(sid))["position"] == "bought"

    await eventually(bought, timeout=15, interval=0.1)
    await trader.sim("POST", "liquidity", THIN)
    stop_ticking = asyncio.Event()

    async def fresh_books() -> None:
        # Each tick brings five fresh bids, so the retry for the remainder can fill.
        while not stop_ticking.is_set():
            await trader.tick("AXISBANK", 1000)
            await asyncio.sleep(0.1)  # ticking period: fresh liquidity ten times a second

    ticker = asyncio.create_task(fresh_books())
    try:
        async def exited() -> bool:
            return (await trader.status(sid))["status"] == "exited"

        await eventually(exited, timeout=30, interval=0.2, message="the remainder was never sold")
    finally:
        stop_ticking.set()
        await ticker
    await asyncio.sleep(0.5)  # let a wrongly placed extra exit arrive before counting
    orders = await trader.broker_orders()
    sells = [o for o in _orders(orders) if o[0] == "SELL"]
    filled = [o for o in sells if o[3] > 0]
    assert filled == [("SELL", QUANTITY, "CANCELLED", THIN_FILL),
                      ("SELL", QUANTITY - THIN_FILL, "COMPLETE", QUANTITY - THIN_FILL)]
    assert all(o[1] == QUANTITY - THIN_FILL for o in sells[1:])  # every retry asked for the remainder only
    assert len({o["tag"] for o in orders if o["transaction_type"] == "SELL"}) == 1
    assert await _net_quantity(trader, "AXISBANK") == 0
    rows = await eventually(lambda: _rows_of(trader, sid, 3), timeout=10, interval=0.2)
    partial = rows[1]["response_payload"]
    assert (rows[1]["event_type"], partial["partial_fill"], partial["remaining_quantity"]) == (
        "SELL", True, QUANTITY - THIN_FILL)
    assert (rows[-1]["event_type"], rows[-1]["status"]) == ("RETRY", "success")
