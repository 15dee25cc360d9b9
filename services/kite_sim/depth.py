"""The simulated order book's liquidity: five seeded depth levels a side, and price bands.

Model (deterministic for a seed, no hidden randomness):

- Level `i` (0..4) of the asks sits at `last + i*tick`, of the bids at
  `last - i*tick`. Its size is `depth_quantity` shares scaled by 0.5x..1.5x
  by a hash of (seed, instrument, quote version, refill generation, side,
  level), rounded down to the lot (at least one lot).
- Fills consume the levels in order. What was taken stays taken until the
  quote's version changes (a new tick brings a fresh book) or the instrument's
  liquidity is refilled (the book's refill loop does this every
  `refill_interval_s` while a MARKET order still has quantity to fill).
- Price bands (circuit limits) are `band_pct` around the day's close, widened
  to contain the last price (the admin API may move prices anywhere).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from services.kite_sim.market import Quote, round_to_tick

LEVELS = 5
BUY, SELL = "BUY", "SELL"
_MASK = 0xFFFFFFFFFFFFFFFF


def _mix(seed: int, token: int, version: int, generation: int, side: int, level: int) -> int:
    """Hash the level's coordinates into 64 bits (stable across processes, unlike hash())."""
    h = (seed * 0x9E3779B97F4A7C15 + token * 0xBF58476D1CE4E5B9 + version * 0x94D049BB133111EB
         + generation * 0xD6E8FEB86659FD93 + side * 0xA0761D6478BD642F + level * 0xE7037ED1A0B428DB) & _MASK
    h = (h ^ (h >> 31)) * 0xFF51AFD7ED558CCD & _MASK
    return h ^ (h >> 33)


def level_quantity(seed: int, token: int, version: int, generation: int, side: str, level: int, lot: int,
                   depth_quantity: int) -> int:
    """Return the size in shares of one depth level (a whole number of lots, at least one)."""
    scale = 50 + _mix(seed, token, version, generation, side == BUY, level) % 101  # percent of depth_quantity
    shares = depth_quantity * scale // 100
    return max(lot, shares // lot * lot)


def level_price(quote: Quote, side: str, level: int) -> int:
    """Return a level's price in paise: asks (what a BUY takes) above last, bids below."""
    tick = quote.instrument.tick_paise
    if side == BUY:
        return quote.last + level * tick
    return max(tick, quote.last - level * tick)


def price_band(quote: Quote, band_pct: float) -> tuple[int, int]:
    """Return (lower, upper) circuit limits in paise."""
    tick = quote.instrument.tick_paise
    low_ref, high_ref = min(quote.close, quote.last), max(quote.close, quote.last)
    lower = round_to_tick(low_ref * (1 - band_pct / 100), tick)
    upper = round_to_tick(high_ref * (1 + band_pct / 100), tick)
    return lower, upper


@dataclass(slots=True)
class Taken:
    """How much of one side of one instrument's book fills have consumed since it was last fresh."""

    version: int
    generation: int
    quantity: int = 0


class Level(NamedTuple):
    """One depth level that still has quantity (paise, shares)."""

    price: int
    quantity: int


class Liquidity:
    """Track what fills took out of each instrument's displayed depth."""

    def __init__(self, seed: int, depth_quantity: int) -> None:
        self.seed = seed
        self.depth_quantity = depth_quantity
        self.taken: dict[tuple[int, str], Taken] = {}
        self.generations: dict[int, int] = {}

    def reset(self) -> None:
        """Forget consumption and refills."""
        self.taken.clear()
        self.generations.clear()

    def refill(self, token: int) -> None:
        """Bring a fresh book for an instrument (new liquidity arrived)."""
        self.generations[token] = self.generations.get(token, 0) + 1

    def _taken(self, quote: Quote, side: str) -> Taken:
        token = quote.instrument.instrument_token
        generation = self.generations.get(token, 0)
        taken = self.taken.get((token, side))
        if taken is None or taken.version != quote.version or taken.generation != generation:
            taken = self.taken[(token, side)] = Taken(quote.version, generation)
        return taken

    def levels(self, quote: Quote, side: str) -> Iterator[Level]:
        """Yield the levels a `side` order can take now, best first (what is left of each)."""
        taken = self._taken(quote, side)
        ins = quote.instrument
        start = 0
        for i in range(LEVELS):
            size = level_quantity(self.seed, ins.instrument_token, taken.version, taken.generation, side, i,
                                  ins.lot_size, self.depth_quantity)
            left = start + size - max(taken.quantity, start)
            start += size
            if left > 0:
                yield Level(level_price(quote, side, i), left)

    def take(self, quote: Quote, side: str, quantity: int, limit: int | None = None) -> list[Level]:
        """Take up to `quantity` from the `side` levels, best first, none priced beyond `limit`.

        Return what was taken at each level (one trade each); it stays taken
        until the book is fresh again.
        """
        taken = self._taken(quote, side)
        ins = quote.instrument
        fills, start, want = [], 0, quantity
        for i in range(LEVELS):
            size = level_quantity(self.seed, ins.instrument_token, taken.version, taken.generation, side, i,
                                  ins.lot_size, self.depth_quantity)
            left = start + size - max(taken.quantity, start)
            start += size
            if left <= 0:
                continue
            price = level_price(quote, side, i)
            if limit is not None and (price > limit if side == BUY else price < limit):
                break
            qty = min(want, left)
            fills.append(Level(price, qty))
            want -= qty
            if not want:
                break
        taken.quantity += quantity - want
        return fills
