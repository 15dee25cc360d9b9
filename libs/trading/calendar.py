"""NSE trading calendar in Asia/Kolkata: trading days, session hours, next run day.

`always_open` mode (paper trading, demo, tests) treats every day as a trading
day and every time of day as inside the session.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

import holidays

IST = ZoneInfo("Asia/Kolkata")
SESSION_OPEN = time(9, 15)
SESSION_CLOSE = time(15, 30)
MIS_SQUARE_OFF = time(15, 20)  # the broker squares MIS positions off from here
CalendarMode = Literal["nse", "always_open"]


class CalendarError(ValueError):
    """Strategy times that cannot trade on this calendar."""


class MarketCalendar:
    """Answer: is this a trading day, and when does a strategy next run."""

    def __init__(self, mode: CalendarMode = "nse", *, extra_holidays: Iterable[date] = (),
                 special_sessions: Iterable[date] = (), sell_safety_margin_s: int = 120) -> None:
        self.mode = mode
        self._extra = frozenset(extra_holidays)
        self._special = frozenset(special_sessions)
        self._years: dict[int, holidays.HolidayBase] = {}
        self.sell_safety_margin_s = sell_safety_margin_s

    @property
    def always_open(self) -> bool:
        return self.mode == "always_open"

    def _holidays(self, year: int) -> holidays.HolidayBase:
        if year not in self._years:
            self._years[year] = holidays.financial_holidays("XNSE", years=year)
        return self._years[year]

    def is_trading_day(self, day: date) -> bool:
        if self.always_open or day in self._special:
            return True
        if day.weekday() >= 5 or day in self._extra:
            return False
        return day not in self._holidays(day.year)

    def latest_sell_time(self) -> time:
        """Return the last allowed sell time: MIS square-off minus the safety margin."""
        cutoff = datetime.combine(date(2000, 1, 3), MIS_SQUARE_OFF) - timedelta(seconds=self.sell_safety_margin_s)
        return cutoff.time()

    def validate_times(self, buy_time: time, sell_time: time) -> None:
        """Raise CalendarError if the times fall outside the tradable session."""
        if self.always_open:
            return
        if buy_time <= SESSION_OPEN:
            raise CalendarError(f"buy_time must be after the market opens at {SESSION_OPEN.isoformat()} IST")
        latest = self.latest_sell_time()
        if sell_time > latest:
            raise CalendarError(
                f"sell_time must be at or before {latest.isoformat()} IST "
                f"(MIS square-off at {MIS_SQUARE_OFF.isoformat()} minus the safety margin)"
            )

    def next_run_day(self, buy_time: time, now: datetime, weekdays: Iterable[int] | None = None) -> date:
        """Return the next trading day on which `buy_time` (IST) is still ahead of `now`.

        `weekdays` (0 = Monday): only those days of the week count; None = every.
        """
        allowed = None if weekdays is None else frozenset(weekdays)
        local = now.astimezone(IST)
        day = local.date()
        if local.time() >= buy_time:
            day += timedelta(days=1)
        for _ in range(400):
            if self.is_trading_day(day) and (allowed is None or day.weekday() in allowed):
                return day
            day += timedelta(days=1)
        raise CalendarError("no trading day within a year")

    def next_trading_day_at(self, t: time, now: datetime) -> datetime:
        """Return the next instant at IST wall-clock `t` on a trading day, strictly after `now`."""
        day = self.next_run_day(t, now)
        return self.at(day, t)

    @staticmethod
    def at(day: date, t: time) -> datetime:
        """Return the UTC instant of IST wall-clock time `t` on `day`."""
        return datetime.combine(day, t, IST).astimezone(UTC)

    def trading_day_of(self, now: datetime) -> date:
        """Return the IST calendar date of `now` (the trading day an event belongs to)."""
        return now.astimezone(IST).date()


def epoch_ms(moment: datetime) -> int:
    """Return a timezone-aware datetime as integer epoch milliseconds (ZSET score)."""
    return int(moment.timestamp() * 1000)
