"""Historical candles: the recorded price path, and a seeded back-history before it.

Since the simulator started (or was reset) every price change is recorded as
minute candles (`market.PricePath`); those are returned as they are, so a
chart agrees with what the ticker sent. Before the start, candles are made
up, deterministically from (seed, instrument, start day), walking backwards
from the start price: each NSE session (weekdays 09:15-15:30 IST) is a
Brownian bridge of 375 one-minute steps from its open to its close, and the
previous day's close sits an overnight gap below or above that open. So the
generated history ends exactly at the price the simulator started from, and
minute and day candles of the same day agree.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import TYPE_CHECKING

from services.kite_sim.market import IST_OFFSET_S, Market, merge_candle, round_to_tick

if TYPE_CHECKING:
    import numpy as np

SESSION_OPEN_MIN = 9 * 60 + 15
SESSION_MINUTES = 375  # 09:15 .. 15:29 IST, one candle a minute
MINUTE_SIGMA = 0.015 / math.sqrt(SESSION_MINUTES)  # about 1.5% daily volatility
GAP_SIGMA = 0.005
MAX_BACK_DAYS = 2500
"""Trading days of generated history before the start (Kite serves up to 2000 days per request)."""

Candle = tuple[int, int, int, int, int, int]
"""(epoch seconds of the candle's start, open, high, low, close, volume), prices in paise."""


def is_trading_day(day: int) -> bool:
    """Tell whether an IST day number is a weekday (the simulator knows no exchange holidays)."""
    return (day + 3) % 7 < 5  # day 0 (1970-01-01) was a Thursday


def day_start_epoch(day: int) -> int:
    """Return the epoch of 00:00 IST on an IST day number."""
    return day * 86400 - IST_OFFSET_S


class BackHistory:
    """Generate the made-up history of one instrument before the simulator started."""

    def __init__(self, seed: int, token: int, tick: int, started_at: float, start_paise: int) -> None:
        self.seed, self.token, self.tick = seed, token, tick
        start_day = int((started_at + IST_OFFSET_S) // 86400)
        minute_of_day = int((started_at + IST_OFFSET_S) % 86400 // 60)
        self.start_day = start_day
        partial = min(max(minute_of_day - SESSION_OPEN_MIN, 0), SESSION_MINUTES) if is_trading_day(start_day) else 0
        # Days before the start, newest first: (day, minutes, open, close), prices as floats in paise.
        rng = random.Random(f"{seed}:{token}:{start_day}")
        self.days: list[tuple[int, int, float, float]] = []
        anchor = float(start_paise)
        if partial:
            opened = anchor * math.exp(rng.gauss(0.0, MINUTE_SIGMA * math.sqrt(partial)))
            self.days.append((start_day, partial, opened, anchor))
            anchor = opened
        day = start_day
        while len(self.days) < MAX_BACK_DAYS:
            day -= 1
            if not is_trading_day(day):
                continue
            # Overnight gaps between generated days; none before the start, which ends the history.
            close = anchor * math.exp(rng.gauss(0.0, GAP_SIGMA)) if self.days else anchor
            opened = close * math.exp(rng.gauss(0.0, MINUTE_SIGMA * math.sqrt(SESSION_MINUTES)))
            self.days.append((day, SESSION_MINUTES, opened, close))
            anchor = opened
        self.by_day = {d[0]: d for d in self.days}

    def minutes(self, day: int) -> list[Candle]:
        """Return the generated minute candles of one day (empty when it is not in the back-history)."""
        entry = self.by_day.get(day)
        if entry is None:
            return []
        return _bridge(self.seed, self.token, self.tick, *entry)

    def day(self, day: int) -> list[int] | None:
        """Return the day's [open, high, low, close, volume], the sum of its minute candles."""
        entry = self.by_day.get(day)
        if entry is None:
            return None
        return list(_day_of_bridge(self.seed, self.token, self.tick, *entry))


@lru_cache(maxsize=65536)
def _day_of_bridge(seed: int, token: int, tick: int, day: int, n: int, opened: float, close: float
                   ) -> tuple[int, int, int, int, int]:
    o, h, lo, c, v = _bridge_arrays(seed, token, tick, day, n, opened, close)
    return int(o[0]), int(h.max()), int(lo.min()), int(c[-1]), int(v.sum())


@lru_cache(maxsize=64)
def _bridge(seed: int, token: int, tick: int, day: int, n: int, opened: float, close: float) -> list[Candle]:
    o, h, lo, c, v = _bridge_arrays(seed, token, tick, day, n, opened, close)
    first = day_start_epoch(day) + SESSION_OPEN_MIN * 60
    return [(first + i * 60, *row) for i, row in enumerate(zip(o.tolist(), h.tolist(), lo.tolist(), c.tolist(),
                                                              v.tolist(), strict=True))]


def _bridge_arrays(seed: int, token: int, tick: int, day: int, n: int, opened: float, close: float
                   ) -> tuple[np.ndarray, ...]:
    """Return open, high, low, close, volume arrays (paise) of a day's n minutes from `opened` to `close`."""
    import numpy as np  # on first use: most simulator runs never chart, and numpy costs 15 MB of RSS

    rng = np.random.default_rng([seed, token, day])
    walk = np.concatenate(([0.0], np.cumsum(rng.normal(0.0, MINUTE_SIGMA, n))))
    steps = np.arange(n + 1) / n
    log_path = math.log(opened) + (math.log(close) - math.log(opened)) * steps + walk - walk[-1] * steps
    path = np.maximum(np.rint(np.exp(log_path) / tick), 1).astype(np.int64) * tick
    path[-1] = round_to_tick(close, tick)
    o, c = path[:-1], path[1:]
    wiggle = np.abs(rng.normal(0.0, MINUTE_SIGMA / 2, n))
    top, bottom = np.maximum(o, c), np.minimum(o, c)
    h = np.maximum(top, np.rint(top * (1 + wiggle) / tick).astype(np.int64) * tick)
    lo = np.maximum(np.minimum(bottom, np.rint(bottom * (1 - wiggle) / tick).astype(np.int64) * tick), tick)
    v = rng.integers(100, 5000, n)
    return o, h, lo, c, v


def back_history(market: Market, token: int) -> BackHistory:
    """Return (cached per start) the back-history of one instrument."""
    return _back_history(market.seed, token, market.by_token[token].tick_paise, market.started_at,
                         market.start_paise[token])


@lru_cache(maxsize=256)
def _back_history(seed: int, token: int, tick: int, started_at: float, start_paise: int) -> BackHistory:
    return BackHistory(seed, token, tick, started_at, start_paise)


def minute_candles(market: Market, token: int, start: int, end: int) -> list[Candle]:
    """Return minute candles starting within [start, end] epoch seconds, oldest first."""
    back = back_history(market, token)
    out: list[Candle] = []
    first_day = max(int((start + IST_OFFSET_S) // 86400), back.start_day - MAX_BACK_DAYS * 2)
    last_day = min(int((end + IST_OFFSET_S) // 86400), back.start_day)
    for day in range(first_day, last_day + 1):
        out.extend(c for c in back.minutes(day) if start <= c[0] <= end)
    for minute, o, h, lo, c, v in market.paths[token].candles():
        if start <= minute * 60 <= end:
            out.append((minute * 60, o, h, lo, c, v))
    return out


def resample(candles: list[Candle], minutes: int) -> list[Candle]:
    """Merge minute candles into `minutes`-long ones aligned to the 09:15 session open."""
    if minutes == 1:
        return candles
    buckets: dict[int, list[int]] = {}
    for ts, o, h, lo, c, v in candles:
        day = (ts + IST_OFFSET_S) // 86400
        minute_of_day = (ts + IST_OFFSET_S) % 86400 // 60
        slot = SESSION_OPEN_MIN + (minute_of_day - SESSION_OPEN_MIN) // minutes * minutes
        merge_candle(buckets, day_start_epoch(day) + slot * 60, o, h, lo, c, v)
    return [(ts, *vals) for ts, vals in buckets.items()]  # type: ignore[misc]


def day_candles(market: Market, token: int, first_day: int, last_day: int) -> list[Candle]:
    """Return day candles of IST days first_day..last_day, oldest first."""
    back = back_history(market, token)
    days: dict[int, list[int]] = {}
    for day in range(max(first_day, back.start_day - MAX_BACK_DAYS * 2), min(last_day, back.start_day) + 1):
        generated = back.day(day)
        if generated is not None:
            days[day] = generated
    path = market.paths[token]
    for day in sorted(path.days):
        if first_day <= day <= last_day:
            o, h, lo, c, v = path.days[day]
            merge_candle(days, day, o, h, lo, c, v)
    for minute, o, h, lo, c, v in path.candles():
        day = (minute * 60 + IST_OFFSET_S) // 86400
        if first_day <= day <= last_day:
            merge_candle(days, day, o, h, lo, c, v)
    return [(day_start_epoch(day), *days[day]) for day in sorted(days)]  # type: ignore[misc]
