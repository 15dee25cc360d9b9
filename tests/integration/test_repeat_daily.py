"""A repeating strategy trades once on each trading day, skipping a holiday, with an injected clock.

Real Redis, Postgres, simulator and executor; the scheduler's mover and re-arm run
in this process on a clock the test moves through two simulated trading days.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from libs.schema.tables import OrderLog, Strategy
from libs.trading.calendar import IST, MarketCalendar
from libs.trading.repeat import NOT_REARMED, rearm_ended_runs
from libs.trading.runs import config_for, load_run, plan_run
from libs.trading.tags import order_tag
from services.scheduler.mover import DueMover
from tests.integration.executor_support import new_account, running_executor
from tests.support.eventually import eventually

MON, TUE, WED, THU, FRI = (date(2026, 11, 30), date(2026, 12, 1), date(2026, 12, 2), date(2026, 12, 3),
                           date(2026, 12, 4))
BUY, SELL = time(10, 0), time(11, 0)


class SteppedClock:
    """A clock the test sets."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def set(self, day: date, t: time, after_s: float = 0.5) -> None:
        self.moment = datetime.combine(day, t, IST).astimezone(UTC).replace(microsecond=int(after_s * 1e6))

    def now(self) -> datetime:
        return self.moment

    def time(self) -> float:
        return self.moment.timestamp()


def test_weekdays_choose_the_next_allowed_trading_day() -> None:
    calendar = MarketCalendar("nse", extra_holidays={WED})
    after_close = datetime.combine(MON, time(16, 0), IST)
    assert calendar.next_run_day(BUY, after_close) == TUE
    assert calendar.next_run_day(BUY, datetime.combine(TUE, time(12, 0), IST)) == THU  # Wednesday: holiday
    assert calendar.next_run_day(BUY, after_close, weekdays=[2, 4]) == FRI  # Wed is a holiday, Fri allowed


async def _is_exited(engine: Any, sid: uuid.UUID) -> bool:
    return await _status(engine, sid) == "exited"


async def _status(engine: Any, sid: uuid.UUID) -> str:
    async with engine.connect() as conn:
        return (await conn.execute(select(Strategy.status).where(Strategy.id == sid))).scalar_one().value


async def test_repeating_strategy_trades_on_two_trading_days_skipping_a_holiday(
        engine: Any, redis: Any, sim: Any, settings: Any) -> None:
    calendar = MarketCalendar("nse", extra_holidays={WED})
    clock = SteppedClock(datetime.combine(MON, time(16, 0), IST))
    account = await new_account(sim, engine, redis)
    sid = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(insert(Strategy).values(
            id=sid, user_id=account.user_id, symbol="INFY", buy_time=BUY, sell_time=SELL, stop_loss=1.0,
            quantity=2, status="running", started_at=clock.now(), repeat="trading_days"))
        row = (await conn.execute(select(Strategy).where(Strategy.id == sid))).one()
    config = config_for(row, api_key_fp=account.api_key_fp)
    first = plan_run(config, calendar, clock.now())
    assert first.trading_day == TUE
    await load_run(redis, config, first)
    mover = DueMover(redis, clock=clock)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    runs = [(config.run_id, TUE)]

    async with running_executor(settings):
        for day in (TUE, THU):
            clock.set(day, BUY)
            assert [m.event_type for m in await mover.move_all_due()] == ["BUY"]
            await eventually(lambda: len(sim.orders(api_key=account.api_key)) == 2 * len(runs) - 1, timeout=20)
            clock.set(day, SELL)
            assert [m.event_type for m in await mover.move_all_due()] == ["SELL"]
            await eventually(lambda: _is_exited(engine, sid), timeout=20)

            async def rearmed() -> list[Any]:
                return await rearm_ended_runs(sessions, redis, calendar, clock.now())

            armed = await eventually(rearmed, timeout=20, message="never re-armed")
            assert [(a.strategy_id, a.trading_day) for a in armed] == [(sid, THU if day == TUE else FRI)]
            runs.append((armed[0].run_id, armed[0].trading_day))
            if day == TUE:
                clock.set(WED, BUY, after_s=0.9)  # the holiday: nothing is due
                assert await mover.move_all_due() == []
                clock.set(WED, SELL, after_s=0.9)
                assert await mover.move_all_due() == []

    orders = sim.orders(api_key=account.api_key)
    assert [(o["transaction_type"], o["status"], o["quantity"]) for o in orders] == [
        ("BUY", "COMPLETE", 2), ("SELL", "COMPLETE", 2)] * 2
    expected_tags = [order_tag(sid, run_id, day, intent) for run_id, day in runs[:2] for intent in ("entry", "exit")]
    assert [o["tag"] for o in orders] == expected_tags  # fresh run id, fresh tags, each day once
    async with engine.connect() as conn:
        days = {r.trading_day for r in (await conn.execute(select(OrderLog.trading_day)
                                                            .where(OrderLog.strategy_id == sid))).all()}
    assert days == {TUE, THU}
    assert await _status(engine, sid) == "running"  # armed for Friday


async def test_a_failed_run_that_may_hold_a_position_is_not_rearmed(engine: Any, redis: Any, sim: Any) -> None:
    calendar = MarketCalendar("always_open")
    account = await new_account(sim, engine, redis)
    sid, started = uuid.uuid4(), datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    async with engine.begin() as conn:
        await conn.execute(insert(Strategy).values(
            id=sid, user_id=account.user_id, symbol="INFY", buy_time=BUY, sell_time=SELL, stop_loss=1.0,
            quantity=1, status="failed", started_at=started, repeat="trading_days", failure_reason="SELL aborted"))
        row = (await conn.execute(select(Strategy).where(Strategy.id == sid))).one()
        plan = plan_run(config_for(row), calendar, started)
        await conn.execute(insert(OrderLog).values(
            id=uuid.uuid4(), strategy_id=sid, user_id=account.user_id, event_type="BUY", status="success",
            trading_day=plan.trading_day, tag=order_tag(sid, plan.buy.run_id, plan.trading_day, "entry")))
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    assert await rearm_ended_runs(sessions, redis, calendar, datetime.now(UTC)) == []
    async with engine.connect() as conn:
        reason = (await conn.execute(select(Strategy.failure_reason).where(Strategy.id == sid))).scalar_one()
    assert reason.startswith(NOT_REARMED) and reason.endswith("SELL aborted")
    assert await _status(engine, sid) == "failed"
    assert await rearm_ended_runs(sessions, redis, calendar, datetime.now(UTC)) == []  # and stays so, quietly
