"""A trading day on a thin, slipping market: each order placed once, the true average price recorded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kiteconnect import KiteConnect

from tests.e2e.harness import Trader
from tests.support.eventually import eventually

QUANTITY = 300
DEPTH_QUANTITY = 20  # five levels of 10..30 shares: every order walks the depth several times
SLIPPAGE_BPS = 15


@pytest.fixture
async def thin_market(trader: Trader) -> AsyncIterator[None]:
    """Make the shared simulator thin and slipping for one test, then put it back."""
    before = await trader.sim("GET", "liquidity")
    await trader.sim("POST", "liquidity", {"slippage_bps": SLIPPAGE_BPS, "depth_quantity": DEPTH_QUANTITY})
    yield
    await trader.sim("POST", "liquidity", before)


def _vwap(trades: list[dict[str, Any]]) -> float:
    return sum(t["quantity"] * t["average_price"] for t in trades) / sum(t["quantity"] for t in trades)


async def test_partial_fills_are_placed_once_and_logged_at_the_true_average(
        trader: Trader, thin_market: None) -> None:
    await trader.tick("INFY", 1500)
    sid = await trader.strategy("INFY", buy_in_s=2, sell_in_s=6, stop_loss=1400, quantity=QUANTITY)

    async def exited() -> bool:
        return (await trader.status(sid))["status"] == "exited"

    await eventually(exited, timeout=30, interval=0.2, message="the strategy never exited")

    async def logged() -> list[dict[str, Any]]:
        rows = list(reversed(await trader.logs(sid)))
        return rows if [(r["event_type"], r["status"]) for r in rows] == [("BUY", "success"),
                                                                        ("SELL", "success")] else []

    rows = await eventually(logged, timeout=10, interval=0.2)
    await asyncio.sleep(0.5)  # let a wrongly placed second order arrive before counting
    orders = await trader.broker_orders()
    assert [(o["transaction_type"], o["quantity"], o["status"], o["filled_quantity"]) for o in orders] == [
        ("BUY", QUANTITY, "COMPLETE", QUANTITY), ("SELL", QUANTITY, "COMPLETE", QUANTITY)]
    assert len({o["tag"] for o in orders}) == 2

    kite = KiteConnect(trader.account["api_key"], access_token=trader.account["access_token"],
                       root=trader.stack.sim_url, timeout=5)
    for row, order in zip(rows, orders, strict=True):
        trades = await asyncio.to_thread(kite.order_trades, order["order_id"])
        assert len(trades) > 5, "the order did not walk the depth"
        true_average = _vwap(trades)
        logged_response = row["response_payload"]
        assert row["broker_order_id"] == order["order_id"]
        assert logged_response["average_price"] == pytest.approx(true_average, abs=1e-9)
        assert logged_response["filled_quantity"] == QUANTITY
        prices = [t["average_price"] for t in trades]
        assert min(prices) < logged_response["average_price"] < max(prices)  # not one trade's (or a quoted) price
