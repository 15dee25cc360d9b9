"""P&L through real processes: every number the API shows equals the one computed from the broker's fills."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.e2e.harness import Trader
from tests.support.eventually import eventually

SLIPPAGE_BPS = 35


@pytest.fixture
async def slippage(trader: Trader) -> AsyncIterator[None]:
    before = await trader.sim("GET", "liquidity")
    await trader.sim("POST", "liquidity", {"slippage_bps": SLIPPAGE_BPS})
    try:
        yield
    finally:
        await trader.sim("POST", "liquidity", before)


def _fills(orders: list[dict], tag_kind: str) -> list[dict]:
    return [o for o in orders if o["status"] == "COMPLETE" and o["tag"].startswith("TW" + tag_kind)]


async def _status_with(trader: Trader, sid: str, **wanted: object) -> dict:
    async def check() -> dict | None:
        st = await trader.status(sid)
        return st if all(st.get(k) == v for k, v in wanted.items()) else None

    return await eventually(check, timeout=25, interval=0.1, message=f"{sid} never reached {wanted}")


@pytest.mark.timeout(90)
async def test_pnl_equals_the_brokers_fills_with_slippage(trader: Trader, slippage: None) -> None:
    await trader.tick("AXISBANK", 1150)
    await trader.tick("LT", 3500)
    sl_sid = await trader.strategy("AXISBANK", buy_in_s=2, sell_in_s=300, stop_loss=1120, quantity=7)
    sq_sid = await trader.strategy("LT", buy_in_s=2, sell_in_s=300, stop_loss=3000, quantity=3)
    await _status_with(trader, sl_sid, position="bought")
    bought = await _status_with(trader, sq_sid, position="bought")

    # While bought: entry from the broker's fill (not the tick), unrealized marked to the last price.
    orders = await trader.broker_orders()
    lt_buy = next(o for o in _fills(orders, "E") if o["tradingsymbol"] == "LT")
    assert bought["entry_average_price"] == lt_buy["average_price"] != 3500
    assert bought["filled_quantity"] == 3 and bought["realized_pnl"] is None
    assert bought["next_buy_at"] is None and bought["next_sell_at"]
    if bought["last_price"] is not None:
        assert bought["unrealized_pnl"] == round((bought["last_price"] - lt_buy["average_price"]) * 3, 2)

    # One stopped out by a tick, one squared off by the user.
    await trader.tick("AXISBANK", 1110)
    await trader.call("POST", "/strategies/stop", {"strategy_id": sq_sid, "square_off": True})
    sl = await _status_with(trader, sl_sid, status="exited", position="exited_by_sl")
    await eventually(lambda: _has_exit(trader, sq_sid), timeout=25, interval=0.1)
    sq = await trader.status(sq_sid)

    orders = await trader.broker_orders()
    by_symbol = {(o["tradingsymbol"], o["transaction_type"]): o for o in orders if o["status"] == "COMPLETE"}
    assert len(by_symbol) == 4
    expected = {}
    for sid, symbol, qty, st in ((sl_sid, "AXISBANK", 7, sl), (sq_sid, "LT", 3, sq)):
        buy, sell = by_symbol[(symbol, "BUY")], by_symbol[(symbol, "SELL")]
        expected[sid] = round((sell["average_price"] - buy["average_price"]) * qty, 2)
        assert (st["entry_average_price"], st["exit_average_price"], st["filled_quantity"]) == (
            buy["average_price"], sell["average_price"], qty)
        assert st["realized_pnl"] == expected[sid]
        assert st["unrealized_pnl"] is None
    # Slippage: the stop-loss exit filled below the tick that triggered it, and it is a loss.
    assert by_symbol[("AXISBANK", "SELL")]["average_price"] < 1110
    assert sl["realized_pnl"] < 0

    listed = {s["id"]: s for s in await trader.call("GET", "/strategies")}
    assert {sid: listed[sid]["realized_pnl"] for sid in expected} == expected
    assert listed[sl_sid]["position"] == "exited_by_sl" and listed[sl_sid]["symbol"] == "AXISBANK"

    summary = await trader.call("GET", "/summary")
    assert summary["mode"] == "paper"
    assert summary["orders_placed"] == 4 and summary["orders_filled"] == 4
    assert summary["realized_pnl"] == round(sum(expected.values()), 2)
    assert summary["strategies_by_status"]["exited"] == 1 and summary["strategies_by_status"]["stopped"] == 1

    trades = await trader.call("GET", "/orders")
    assert sorted((t["symbol"], t["kind"], t["average_price"]) for t in trades) == sorted(
        (o["tradingsymbol"], {"E": "BUY"}.get(o["tag"][2], "STOPLOSS" if o["tradingsymbol"] == "AXISBANK" else "SELL"),
         o["average_price"]) for o in orders if o["status"] == "COMPLETE")
    assert {t["strategy_id"]: t["realized_pnl"] for t in trades if t["side"] == "SELL"} == expected

    positions = await trader.call("GET", "/positions")
    flat = {p["symbol"]: p for p in positions}
    assert set(flat) == {"AXISBANK", "LT"}
    assert flat["AXISBANK"]["quantity"] == 0 and [s["id"] for s in flat["AXISBANK"]["strategies"]] == [sl_sid]
    assert flat["LT"]["realised"] == expected[sq_sid]


async def _has_exit(trader: Trader, sid: str) -> bool:
    st = await trader.status(sid)
    return st["exit_average_price"] is not None


async def test_trade_book_exports_csv(trader: Trader, http: aiohttp.ClientSession) -> None:
    await trader.tick("KOTAKBANK", 1780)
    sid = await trader.strategy("KOTAKBANK", buy_in_s=2, sell_in_s=4, stop_loss=1500, quantity=2)
    await _status_with(trader, sid, status="exited")
    await eventually(lambda: _trades_of(trader, sid, 2), timeout=15, interval=0.1)
    async with http.get(f"{trader.stack.api_url}/api/v1/orders?format=csv",
                        headers={"Authorization": f"Bearer {trader.token}"}) as resp:
        assert resp.status == 200 and resp.content_type == "text/csv"
        assert "attachment" in resp.headers["Content-Disposition"]
        lines = (await resp.text()).strip().splitlines()
    assert lines[0].startswith("filled_at,trading_day,symbol,kind,side,quantity,average_price,realized_pnl")
    assert [line.split(",")[2:5] for line in lines[1:]] == [["KOTAKBANK", "SELL", "SELL"], ["KOTAKBANK", "BUY", "BUY"]]
    bad = await trader.call("GET", "/orders?from=2025-13-01", expect=422)
    assert bad["error"]["details"][0]["loc"] == ["query", "from"]
    # The trade book is the record of money that moved: it outlives the strategy.
    await trader.call("DELETE", f"/strategies/{sid}", expect=204)
    await trader.call("GET", f"/strategies/{sid}", expect=404)
    assert await _trades_of(trader, sid, 2)


async def _trades_of(trader: Trader, sid: str, count: int) -> bool:
    return len([t for t in await trader.call("GET", "/orders") if t["strategy_id"] == sid]) == count
