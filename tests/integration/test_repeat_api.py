"""Repeat settings through the API, the trading day a start names, and the pre-open check across replicas."""

from __future__ import annotations

import asyncio
from datetime import date, datetime, time, timedelta

import pytest
from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from libs.schema.tables import Strategy
from libs.service.clock import SystemClock
from libs.trading.calendar import IST, MarketCalendar
from libs.trading.repeat import rearm_ended_runs
from libs.trading.tokens import TokenChecker
from services.api.deps import BOX, ENGINE, GATEWAY, REDIS
from services.scheduler.daily import DailyTasks
from services.scheduler.settings import SchedulerSettings
from tests.integration.api_support import ApiHarness, clock

pytest_plugins = ["tests.integration.api_support"]


async def test_repeat_and_weekdays_round_trip_and_validate(api: ApiHarness) -> None:
    user = await api.connected_user()
    made = await api.strategy(user, buy_time="10:00:00", sell_time="11:00:00", repeat="trading_days",
                              weekdays=["wed", "mon", "wed"])
    assert made["repeat"] == "trading_days" and made["weekdays"] == ["mon", "wed"]
    bad = await api.v1("POST", "/strategies", {"symbol": "INFY", "buy_time": "10:00:00", "sell_time": "11:00:00",
                                               "stop_loss": 1, "quantity": 1, "weekdays": ["mon"]}, user=user)
    assert bad.status == 422 and bad.body["error"]["code"] == "validation_error"
    typo = await api.v1("POST", "/strategies", {"symbol": "INFY", "buy_time": "10:00:00", "sell_time": "11:00:00",
                                                "stop_loss": 1, "quantity": 1, "repeat": "daily"}, user=user)
    assert typo.status == 422
    every_day = await api.v1("PATCH", f"/strategies/{made['id']}", {"weekdays": None}, user=user, expect=200)
    assert every_day.body["weekdays"] is None and every_day.body["repeat"] == "trading_days"
    once = await api.v1("PATCH", f"/strategies/{made['id']}", {"repeat": "once"}, user=user, expect=200)
    assert once.body["repeat"] == "once"


async def test_start_after_buy_time_names_the_next_trading_day(api: ApiHarness) -> None:
    if datetime.now(IST).time() < time(0, 5):
        pytest.skip("no buy_time earlier today yet")
    user = await api.connected_user()
    late = await api.strategy(user, buy_time=clock(-120), sell_time=clock(-60))
    started = await api.v1("POST", "/strategies/start", {"strategy_id": late["id"]}, user=user, expect=200)
    today = datetime.now(IST).date()
    assert started.body["trading_day"] == (today + timedelta(days=1)).isoformat()
    next_buy = datetime.fromisoformat(started.body["next_buy_at"].replace("Z", "+00:00")).astimezone(IST)
    assert next_buy.date() == today + timedelta(days=1)  # an instant (UTC); its IST date is the trading day
    weekly = await api.strategy(user, buy_time=clock(-120), sell_time=clock(-60), repeat="trading_days",
                                weekdays=[("mon", "tue", "wed", "thu", "fri", "sat", "sun")[today.weekday()]])
    started = await api.v1("POST", "/strategies/start", {"strategy_id": weekly["id"]}, user=user, expect=200)
    assert started.body["trading_day"] == (today + timedelta(days=7)).isoformat()  # its weekday, next week
    assert started.body["repeat"] == "trading_days"


async def test_preopen_check_runs_once_per_account_across_replicas_and_flags_the_strategy(
        api: ApiHarness, redis_url: str) -> None:
    user = await api.connected_user()
    strategy = await api.strategy(user, buy_time="10:00:00", sell_time="11:00:00")
    await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user, expect=200)
    api.sim.expire(user.broker["api_key"])
    app = api.app
    sessions = async_sessionmaker(app[ENGINE], expire_on_commit=False)
    checker = TokenChecker(sessions, app[REDIS], app[BOX], app[GATEWAY])
    settings = SchedulerSettings(redis_url=redis_url, preopen_check_time=time(8, 45))
    replicas = [DailyTasks(settings, app[REDIS], sessions, MarketCalendar("always_open"), SystemClock(),
                           asyncio.Event(), checker) for _ in range(3)]
    day = date.today()
    counts = await asyncio.gather(*(r.preopen_check(day) for r in replicas))
    assert sum(c["checked"] for c in counts) == 1 and sum(c["expired"] for c in counts) == 1
    status = (await api.v1("GET", f"/strategies/{strategy['id']}/status", user=user, expect=200)).body
    assert status["needs_login"] is True and "Kite session expired" in status["reason"]
    broker = (await api.v1("GET", "/broker", user=user, expect=200)).body
    assert broker["token_state"] == "expired" and broker["is_valid"] is False
    assert all(c["checked"] == 0 for c in await asyncio.gather(*(r.preopen_check(day) for r in replicas)))
    # A fresh token (what the login callback stores) clears the flag at once.
    token = api.sim.call("POST", f"/sim/accounts/{user.broker['api_key']}/request_token")["request_token"]
    await api.v1("POST", "/broker/session", {"request_token": token}, user=user, expect=200)
    cleared = (await api.v1("GET", f"/strategies/{strategy['id']}/status", user=user, expect=200)).body
    assert cleared["needs_login"] is False and cleared["reason"] is None


async def test_stop_and_kill_switch_end_a_series_between_two_runs(api: ApiHarness) -> None:
    user = await api.connected_user()
    ids = [(await api.strategy(user, buy_time="10:00:00", sell_time="11:00:00", repeat="trading_days"))["id"]
           for _ in range(2)]
    async with api.app[ENGINE].begin() as conn:  # both runs just ended; the next is not armed yet
        await conn.execute(update(Strategy).where(Strategy.id.in_(ids)).values(status="exited",
                                                                                 started_at=func.now()))
    stopped = await api.v1("POST", "/strategies/stop", {"strategy_id": ids[0]}, user=user, expect=200)
    assert stopped.body["status"] == "stopped"
    pressed = await api.v1("POST", "/kill-switch", {"square_off": True}, user=user, expect=200)
    assert [(r["strategy_id"], r["action"]) for r in pressed.body["strategies"]] == [(ids[1], "stopped")]
    sessions = async_sessionmaker(api.app[ENGINE], expire_on_commit=False)
    assert await rearm_ended_runs(sessions, api.app[REDIS], MarketCalendar("always_open"), datetime.now(IST)) == []
    rows = {s["id"]: s["status"] for s in (await api.v1("GET", "/strategies", user=user)).body}
    assert rows == {ids[0]: "stopped", ids[1]: "stopped"}
