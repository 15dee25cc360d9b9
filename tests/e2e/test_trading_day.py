"""The product's stories, through real processes: HTTP API in, paper broker out."""

from __future__ import annotations

import asyncio

from tests.e2e.harness import Stack, Trader
from tests.support.eventually import eventually

TERMINAL = ("exited", "stopped", "failed")


async def _events(trader: Trader, sid: str) -> list[tuple[str, str]]:
    return [(r["event_type"], r["status"]) for r in reversed(await trader.logs(sid))]


async def _wait_status(trader: Trader, sid: str, status: str, timeout: float = 25) -> dict:
    async def check() -> dict | None:
        st = await trader.status(sid)
        return st if st["status"] == status else None

    return await eventually(check, timeout=timeout, interval=0.1, message=f"{sid} never became {status}")


async def test_strategy_buys_then_sells_at_its_times(trader: Trader) -> None:
    await trader.tick("INFY", 1500)
    sid = await trader.strategy("INFY", buy_in_s=2, sell_in_s=5, stop_loss=1400, quantity=10)
    status = await _wait_status(trader, sid, "exited")
    assert status["position"] == "sold"
    await eventually(lambda: _has_events(trader, sid, [("BUY", "success"), ("SELL", "success")]), timeout=10)
    orders = await trader.broker_orders()
    assert [(o["transaction_type"], o["quantity"], o["status"]) for o in orders] == [
        ("BUY", 10, "COMPLETE"), ("SELL", 10, "COMPLETE")]


async def _has_events(trader: Trader, sid: str, wanted: list[tuple[str, str]]) -> bool:
    return await _events(trader, sid) == wanted


async def test_stoploss_fires_once_though_the_price_keeps_falling(trader: Trader) -> None:
    await trader.tick("RELIANCE", 2500)
    sid = await trader.strategy("RELIANCE", buy_in_s=2, sell_in_s=60, stop_loss=2450, quantity=5)
    await eventually(lambda: trader.has_position(sid, "bought"), timeout=15)
    for price in (2449, 2440, 2420, 2400, 2380):
        await trader.tick("RELIANCE", price)
    status = await _wait_status(trader, sid, "exited")
    assert status["position"] == "exited_by_sl"
    await asyncio.sleep(0.5)  # let any wrongly emitted second exit arrive before counting
    sells = [o for o in await trader.broker_orders() if o["transaction_type"] == "SELL"]
    assert len(sells) == 1
    assert await _events(trader, sid) == [("BUY", "success"), ("STOPLOSS", "success")]


async def test_user_stops_a_strategy_before_its_buy(trader: Trader) -> None:
    await trader.tick("TCS", 3500)  # the session's simulator keeps other tests' prices: set this test's market
    sid = await trader.strategy("TCS", buy_in_s=4, sell_in_s=8, stop_loss=3000)
    stopped = await trader.call("POST", "/strategies/stop", {"strategy_id": sid})
    assert stopped["status"] == "stopped"
    await asyncio.sleep(5)  # past the buy time: nothing may happen
    assert await trader.broker_orders() == []
    assert (await trader.status(sid))["position"] == "none"


async def test_sell_after_a_stoploss_exit_is_skipped(trader: Trader) -> None:
    await trader.tick("SBIN", 800)
    sid = await trader.strategy("SBIN", buy_in_s=2, sell_in_s=7, stop_loss=790, quantity=2)
    await eventually(lambda: trader.has_position(sid, "bought"), timeout=15)
    await trader.tick("SBIN", 780)
    await _wait_status(trader, sid, "exited")
    await asyncio.sleep(6)  # the SELL time passes
    sells = [o for o in await trader.broker_orders() if o["transaction_type"] == "SELL"]
    assert len(sells) == 1
    assert ("SELL", "success") not in await _events(trader, sid)


async def test_stop_with_square_off_sells_the_position(trader: Trader) -> None:
    await trader.tick("HDFCBANK", 1600)
    sid = await trader.strategy("HDFCBANK", buy_in_s=2, sell_in_s=120, stop_loss=1500, quantity=3)
    await eventually(lambda: trader.has_position(sid, "bought"), timeout=15)
    await trader.call("POST", "/strategies/stop", {"strategy_id": sid, "square_off": True})

    async def sold() -> bool:
        orders = await trader.broker_orders()
        return [(o["transaction_type"], o["status"]) for o in orders] == [("BUY", "COMPLETE"),
                                                                          ("SELL", "COMPLETE")]

    await eventually(sold, timeout=15)
    assert (await trader.strategy_row(sid))["status"] == "stopped"


async def test_replicas_still_place_one_order_per_event(e2e_stack: Stack, trader: Trader) -> None:
    for service, count in (("scheduler", 1), ("market_listener", 1), ("executor", 2)):
        for _ in range(count):
            e2e_stack.add_replica(service)
    await trader.tick("ITC", 400)
    sids = [await trader.strategy("ITC", buy_in_s=3, sell_in_s=60, stop_loss=390 - i, quantity=1)
            for i in range(8)]
    for sid in sids:
        await eventually(lambda sid=sid: trader.has_position(sid, "bought"), timeout=20)
    await trader.tick("ITC", 370)  # under every stop
    for sid in sids:
        await _wait_status(trader, sid, "exited")
    await asyncio.sleep(1)  # let any duplicate that slipped through arrive before counting
    orders = await trader.broker_orders()
    tags = [o["tag"] for o in orders]
    assert len(orders) == 2 * len(sids)
    assert len(set(tags)) == len(tags), "a tag reached the broker twice"

