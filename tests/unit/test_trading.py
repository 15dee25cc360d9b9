"""Pure trading logic: calendar, tags, run plans."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from uuid import uuid4

import pytest

from libs.schema.models import StrategyConfig
from libs.trading.calendar import IST, CalendarError, MarketCalendar
from libs.trading.runs import plan_run, run_id_for
from libs.trading.tags import intent_of, order_tag


def test_tag_is_20_chars_deterministic_and_distinct_per_intent() -> None:
    sid, day = uuid4(), date(2026, 11, 25)
    entry = order_tag(sid, "run-1", day, "entry")
    exit_ = order_tag(sid, "run-1", day, "exit")
    assert len(entry) == len(exit_) == 20
    assert entry.isalnum() and entry.isupper()
    assert entry == order_tag(str(sid), "run-1", day, "entry")
    assert entry != exit_
    assert entry != order_tag(sid, "run-2", day, "entry")


def test_sell_and_stoploss_share_the_exit_intent() -> None:
    assert intent_of("BUY") == "entry"
    assert intent_of("SELL") == intent_of("STOPLOSS") == "exit"


def test_nse_calendar_skips_weekends_and_holidays() -> None:
    cal = MarketCalendar("nse")
    assert not cal.is_trading_day(date(2026, 11, 28))  # Saturday
    assert not cal.is_trading_day(date(2026, 1, 26))  # Republic Day
    assert cal.is_trading_day(date(2026, 11, 25))
    friday_after_buy = datetime(2026, 11, 27, 10, 0, tzinfo=IST)
    assert cal.next_run_day(time(9, 30), friday_after_buy) == date(2026, 11, 30)
    before_buy = datetime(2026, 11, 25, 9, 0, tzinfo=IST)
    assert cal.next_run_day(time(9, 30), before_buy) == date(2026, 11, 25)


def test_always_open_calendar_runs_on_sundays() -> None:
    cal = MarketCalendar("always_open")
    sunday = datetime(2026, 11, 29, 8, 0, tzinfo=IST)
    assert cal.next_run_day(time(9, 30), sunday) == date(2026, 11, 29)
    cal.validate_times(time(0, 0, 1), time(23, 59, 59))


@pytest.mark.parametrize(("buy", "sell"), [(time(9, 15), time(10, 0)), (time(9, 30), time(15, 19))])
def test_nse_calendar_rejects_times_outside_the_session(buy: time, sell: time) -> None:
    with pytest.raises(CalendarError):
        MarketCalendar("nse").validate_times(buy, sell)


def test_plan_run_is_deterministic_and_in_ist() -> None:
    started = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)  # 08:30 IST
    config = StrategyConfig(strategy_id=uuid4(), user_id=uuid4(), symbol="INFY", buy_time="09:30:00",
                            sell_time="15:00:00", stop_loss=1500.5, quantity=10, status="running",
                            run_id=run_id_for(started))
    cal = MarketCalendar("nse")
    a, b = plan_run(config, cal, started), plan_run(config, cal, started)
    assert a == b
    assert a.trading_day == date(2026, 11, 25)
    assert a.buy.trigger_time == datetime(2026, 11, 25, 4, 0, tzinfo=UTC)
    assert a.sell_due_ms - a.buy_due_ms == (5 * 3600 + 30 * 60) * 1000
    assert a.buy.run_id == config.run_id


def test_the_suite_waits_out_ist_midnight_only_near_it() -> None:
    from tests.conftest import seconds_until_clear_of_ist_midnight

    day = datetime(2026, 11, 30, tzinfo=IST)
    assert seconds_until_clear_of_ist_midnight(day.replace(hour=12)) == 0
    assert seconds_until_clear_of_ist_midnight(day.replace(hour=23, minute=39)) == 0
    assert seconds_until_clear_of_ist_midnight(day.replace(hour=23, minute=50)) == 16 * 60
    assert seconds_until_clear_of_ist_midnight(day.replace(hour=0, minute=2)) == 4 * 60
    assert seconds_until_clear_of_ist_midnight(day.replace(hour=0, minute=6)) == 0
