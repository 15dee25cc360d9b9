"""Simulated NSE market: instruments, last prices, seeded random walk, CSV replay.

Prices are kept as integer paise, the unit Kite's binary ticks carry, so a
price set through the admin API reaches the ticker and the order book
without float drift. Every price change is announced synchronously to the
registered listeners (order matching, tick fan-out): no batching delay.
"""

from __future__ import annotations

import asyncio
import csv
import io
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

DATA_FILE = Path(__file__).with_name("data") / "nse_equities.csv"
INSTRUMENT_COLUMNS = (
    "instrument_token",
    "exchange_token",
    "tradingsymbol",
    "name",
    "last_price",
    "expiry",
    "strike",
    "tick_size",
    "lot_size",
    "instrument_type",
    "segment",
    "exchange",
)

PriceListener = Callable[[list["Quote"]], None]


@dataclass(slots=True)
class Instrument:
    """One tradable NSE equity as the instruments dump lists it."""

    instrument_token: int
    exchange_token: int
    tradingsymbol: str
    name: str
    base_paise: int
    tick_paise: int
    lot_size: int
    exchange: str = "NSE"


@dataclass(slots=True)
class Quote:
    """Live state of one instrument: last price, day OHLC, volume (paise, shares)."""

    instrument: Instrument
    last: int
    open: int
    high: int
    low: int
    close: int
    volume: int = 0
    last_qty: int = 0
    turnover: int = field(default=0)  # paise * shares, for the average traded price
    version: int = 0
    updated_at: float = 0.0

    def average_paise(self) -> int:
        """Return the volume-weighted average traded price in paise."""
        return self.turnover // self.volume if self.volume else self.last


def load_instruments(path: Path = DATA_FILE) -> list[Instrument]:
    """Read the bundled instruments dump."""
    with path.open(newline="", encoding="utf-8") as fh:
        return [
            Instrument(
                instrument_token=int(row["instrument_token"]),
                exchange_token=int(row["exchange_token"]),
                tradingsymbol=row["tradingsymbol"],
                name=row["name"],
                base_paise=round(float(row["last_price"]) * 100),
                tick_paise=max(1, round(float(row["tick_size"]) * 100)),
                lot_size=int(row["lot_size"]),
                exchange=row["exchange"],
            )
            for row in csv.DictReader(fh)
        ]


def render_instruments_csv(instruments: Iterable[Instrument]) -> bytes:
    """Render instruments in Kite's dump format (built once, served as is)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(INSTRUMENT_COLUMNS)
    for ins in instruments:
        writer.writerow(
            (
                ins.instrument_token,
                ins.exchange_token,
                ins.tradingsymbol,
                ins.name,
                f"{ins.base_paise / 100:.2f}",
                "",
                "0",  # kiteconnect float()s strike, so it must not be empty
                f"{ins.tick_paise / 100:.2f}",
                ins.lot_size,
                "EQ",
                ins.exchange,
                ins.exchange,
            )
        )
    return buf.getvalue().encode()


def round_to_tick(paise: float, tick: int) -> int:
    """Round a price in paise to the nearest tick, never below one tick."""
    return max(tick, int(round(paise / tick)) * tick)


class Market:
    """Hold instruments and live quotes; move prices and announce changes."""

    def __init__(self, instruments: list[Instrument], seed: int = 1, walk_bps: float = 5.0) -> None:
        self.instruments = instruments
        self.by_symbol = {i.tradingsymbol: i for i in instruments}
        self.by_token = {i.instrument_token: i for i in instruments}
        self.instruments_csv = render_instruments_csv(instruments)
        self.empty_csv = render_instruments_csv(())
        self.walk_sigma = walk_bps / 10_000
        self.seed = seed
        self.rng = random.Random(seed)
        self.listeners: list[PriceListener] = []
        self.quotes: dict[int, Quote] = {}
        self.reset()

    def reset(self) -> None:
        """Put every price back to its base and reseed the walk."""
        self.rng = random.Random(self.seed)
        now = time.time()
        self.quotes = {
            i.instrument_token: Quote(i, i.base_paise, i.base_paise, i.base_paise, i.base_paise, i.base_paise,
                                      updated_at=now)
            for i in self.instruments
        }

    def resolve(self, symbol: str) -> Instrument | None:
        """Find an instrument by `SYMBOL` or `NSE:SYMBOL`."""
        exchange, _, sym = symbol.rpartition(":")
        ins = self.by_symbol.get(sym)
        if ins is None or (exchange and exchange != ins.exchange):
            return None
        return ins

    def quote(self, ins: Instrument) -> Quote:
        """Return the live quote of an instrument."""
        return self.quotes[ins.instrument_token]

    def last_price(self, ins: Instrument) -> float:
        """Return the last price in rupees."""
        return self.quotes[ins.instrument_token].last / 100

    def set_prices(self, updates: Iterable[tuple[Instrument, int]], qty: int = 0) -> list[Quote]:
        """Set last prices (paise) and announce them to the listeners at once."""
        now = time.time()
        changed: list[Quote] = []
        for ins, paise in updates:
            q = self.quotes[ins.instrument_token]
            q.last = paise
            q.high = max(q.high, paise)
            q.low = min(q.low, paise)
            if qty:
                q.last_qty = qty
                q.volume += qty
                q.turnover += qty * paise
            q.version += 1
            q.updated_at = now
            changed.append(q)
        for listener in self.listeners:
            listener(changed)
        return changed

    def record_fill(self, ins: Instrument, qty: int, paise: int) -> None:
        """Count a simulated fill in the day's volume without moving the price."""
        q = self.quotes[ins.instrument_token]
        q.volume += qty
        q.last_qty = qty
        q.turnover += qty * paise

    def walk_step(self) -> list[Quote]:
        """Move every instrument one seeded log-normal step."""
        gauss = self.rng.gauss
        sigma = self.walk_sigma
        updates = []
        for ins in self.instruments:
            last = self.quotes[ins.instrument_token].last
            updates.append((ins, round_to_tick(last * math.exp(gauss(0.0, sigma)), ins.tick_paise)))
        return self.set_prices(updates, qty=self.rng.randint(1, 500))


async def run_walk(market: Market, interval_s: float) -> None:
    """Step the random walk forever on a fixed schedule."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        next_at += interval_s
        # Sleep to an absolute schedule so a slow step does not stretch the period.
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        market.walk_step()


def load_replay(path: Path, market: Market) -> list[tuple[float, Instrument, int]]:
    """Read a replay CSV (ts_offset_ms,symbol,last_price) into sorted steps."""
    steps: list[tuple[float, Instrument, int]] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            ins = market.resolve(row["symbol"].strip())
            if ins is None:
                raise ValueError(f"replay: unknown symbol {row['symbol']!r}")
            paise = round(float(row["last_price"]) * 100)
            steps.append((float(row["ts_offset_ms"]) / 1000, ins, paise))
    steps.sort(key=lambda s: s[0])
    return steps


async def run_replay(market: Market, steps: list[tuple[float, Instrument, int]], loop_forever: bool) -> None:
    """Apply replay steps at their offsets; rows sharing an offset tick together."""
    loop = asyncio.get_running_loop()
    if not steps:
        return
    period = steps[-1][0] + 0.001
    while True:
        start = loop.time()
        i = 0
        while i < len(steps):
            offset = steps[i][0]
            await asyncio.sleep(max(0.0, start + offset - loop.time()))
            batch = []
            while i < len(steps) and steps[i][0] == offset:
                batch.append((steps[i][1], steps[i][2]))
                i += 1
            market.set_prices(batch, qty=1)
        if not loop_forever:
            return
        await asyncio.sleep(max(0.0, start + period - loop.time()))
