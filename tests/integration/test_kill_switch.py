"""The kill switch with strategies waiting, bought and mid-exit; and the operator halt.

The API runs in-process; a real executor (in-process) trades on the simulator,
and a stand-in scheduler moves due events in real time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest

from libs.schema import keys
from libs.trading.calendar import IST
from tests.integration import api_support
from tests.integration.api_support import ApiHarness, User, clock
from tests.integration.executor_support import executor_settings, fake_scheduler, running_executor
from tests.support.eventually import eventually

pytest_plugins = ["tests.integration.api_support"]


@pytest.fixture
def exec_settings(redis_url: str, clean_db: str, sim: Any) -> Any:
    yield executor_settings(redis_url, clean_db, sim.base_url, secret_key=api_support.SECRET_KEY)
    sim.set_faults()


async def _position(api: ApiHarness, user: User, sid: str) -> str:
    return (await api.v1("GET", f"/strategies/{sid}/status", user=user, expect=200)).body["position"]


def soon(offset_s: int) -> str:
    """Return IST wall-clock HH:MM:SS `offset_s` from now (at most 23:59:59 today): fires during the test."""
    now = datetime.now(IST)
    return min(now + timedelta(seconds=offset_s), now.replace(hour=23, minute=59, second=59)).strftime("%H:%M:%S")


async def _started(api: ApiHarness, user: User, buy_in: int | None, sell_in: int | None) -> str:
    """Start a strategy buying buy_in s from now (None: hours away, never during the test)."""
    times = {"buy_time": soon(buy_in) if buy_in is not None else clock(3600),
             "sell_time": soon(sell_in) if sell_in is not None else clock(7200)}
    sid = (await api.strategy(user, **times))["id"]
    await api.v1("POST", "/strategies/start", {"strategy_id": sid}, user=user, expect=200)
    return sid


def _sells_by_tag(api: ApiHarness, user: User) -> Counter[str]:
    return Counter(o["tag"] for o in api.sim.orders(api_key=user.broker["api_key"])
                   if o["transaction_type"] == "SELL")


async def test_kill_switch_squares_off_each_held_position_once(api: ApiHarness, redis: Any,
                                                               exec_settings: Any) -> None:
    user = await api.connected_user()
    async with fake_scheduler(redis), running_executor(exec_settings):
        waiting = await _started(api, user, None, None)
        bought = await _started(api, user, 2, 3600)
        exiting = await _started(api, user, 2, 7)
        for sid in (bought, exiting):
            await eventually(lambda sid=sid: _is(_position(api, user, sid), "bought"), timeout=20)
        api.sim.set_faults(latency_ms=900, routes=["orders"])  # the SELL of `exiting` takes a while
        await eventually(lambda: redis.exists(keys.lock_key(exiting)), timeout=20, interval=0.005,
                         message="the exit never went in flight")
        first = await api.v1("POST", "/kill-switch", {"square_off": True}, user=user, expect=200)
        actions = {r["strategy_id"]: r["action"] for r in first.body["strategies"]}
        assert actions[waiting] == "stopped" and actions[bought] == "squaring_off"
        assert actions[exiting] in ("stopped", "unchanged")  # its own SELL went out; no square-off after it
        second = await api.v1("POST", "/kill-switch", {"square_off": True}, user=user, expect=200)
        assert second.body == {"strategies": [], "stopped": 0, "squaring_off": 0}

        await eventually(lambda: len(_sells_by_tag(api, user)) == 2, timeout=20)
        await asyncio.sleep(1.5)  # let any wrongly queued second exit reach the broker before counting
    sells = _sells_by_tag(api, user)
    assert sorted(sells.values()) == [1, 1], sells
    orders = api.sim.orders(api_key=user.broker["api_key"])
    assert Counter(o["transaction_type"] for o in orders) == {"BUY": 2, "SELL": 2}
    rows = {s["id"]: s["status"] for s in (await api.v1("GET", "/strategies", user=user)).body}
    assert rows[waiting] == "stopped" and rows[bought] == "stopped" and rows[exiting] in ("stopped", "exited")


async def test_kill_switch_validates_and_needs_a_user(api: ApiHarness) -> None:
    user = await api.user()
    bad = await api.v1("POST", "/kill-switch", {"square_off": "yes"}, user=user)
    assert bad.status == 422 and bad.body["error"]["code"] == "validation_error"
    assert (await api.v1("POST", "/kill-switch", {"square_off": True})).status == 401
    empty = await api.v1("POST", "/kill-switch", {}, user=user, expect=200)
    assert empty.body["strategies"] == []


async def test_halt_skips_entries_but_not_exits_and_clears(api: ApiHarness, redis: Any,
                                                           exec_settings: Any) -> None:
    user = await api.connected_user()
    async with fake_scheduler(redis), running_executor(exec_settings):
        held = await _started(api, user, 2, 8)
        await eventually(lambda: _is(_position(api, user, held), "bought"), timeout=20)
        await redis.set(keys.OPERATOR_HALT, "broker incident")
        halted = await _started(api, user, 2, 3600)
        await eventually(lambda: _is(_row_status(api, user, halted), "failed"), timeout=20)
        await eventually(lambda: _is(_row_status(api, user, held), "exited"), timeout=20)  # its SELL went out
        logs = (await api.v1("GET", f"/strategies/{halted}/orders", user=user, expect=200)).body
        assert [(r["event_type"], r["status"]) for r in logs] == [("BUY", "skipped")]
        assert "operator halt" in logs[0]["response_payload"]["skipped"]
        status = (await api.v1("GET", f"/strategies/{halted}/status", user=user)).body
        assert "operator halt" in status["reason"]
        await redis.delete(keys.OPERATOR_HALT)
        await asyncio.sleep(1.2)  # the executors' cached read of the halt key expires
        resumed = await _started(api, user, 2, 3600)
        await eventually(lambda: _is(_position(api, user, resumed), "bought"), timeout=20)
    sides = [o["transaction_type"] for o in api.sim.orders(api_key=user.broker["api_key"])]
    assert sides == ["BUY", "SELL", "BUY"]


async def _row_status(api: ApiHarness, user: User, sid: str) -> str:
    return (await api.v1("GET", f"/strategies/{sid}", user=user, expect=200)).body["status"]


async def _is(value: Any, wanted: str) -> bool:
    return await value == wanted
