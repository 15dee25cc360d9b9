"""Per-symbol index of bought strategies sorted by stop-loss.

A tick at price p fires every entry with stop_loss >= p: those sit at the top
of the sorted list, so one bisect finds them (O(log n + k)), and the common
case, nothing to fire, is one comparison with the highest stop-loss. Fired
entries leave the index at once, so a strategy fires once however far the
price keeps falling.
"""

from __future__ import annotations

from datetime import date
from typing import NamedTuple

from sortedcontainers import SortedList


class Watch(NamedTuple):
    """One bought strategy watched for its stop-loss (ordered by stop_loss first)."""

    stop_loss: float
    strategy_id: str
    run_id: str
    trading_day: date
    symbol: str


_NOTHING: list[Watch] = []


class StopLossIndex:
    """Bought strategies by symbol, sorted by stop_loss."""

    def __init__(self) -> None:
        self.by_symbol: dict[str, SortedList] = {}
        self._watches: dict[str, Watch] = {}

    def __len__(self) -> int:
        return len(self._watches)

    def __contains__(self, strategy_id: str) -> bool:
        return strategy_id in self._watches

    def add(self, watch: Watch) -> None:
        """Watch a bought strategy (replacing an earlier watch of it)."""
        self.remove(watch.strategy_id)
        self._watches[watch.strategy_id] = watch
        entries = self.by_symbol.get(watch.symbol)
        if entries is None:
            entries = self.by_symbol[watch.symbol] = SortedList()
        entries.add(watch)

    def remove(self, strategy_id: str) -> bool:
        """Stop watching a strategy; return True if it was watched."""
        watch = self._watches.pop(strategy_id, None)
        if watch is None:
            return False
        entries = self.by_symbol[watch.symbol]
        entries.discard(watch)
        if not entries:
            del self.by_symbol[watch.symbol]
        return True

    def pop_triggered(self, symbol: str, price: float) -> list[Watch]:
        """Remove and return every watch on `symbol` with stop_loss >= price."""
        entries = self.by_symbol.get(symbol)
        if entries is None or entries[-1].stop_loss < price:
            return _NOTHING
        start = entries.bisect_left((price,))
        fired = list(entries.islice(start))
        del entries[start:]
        if not entries:
            del self.by_symbol[symbol]
        for watch in fired:
            del self._watches[watch.strategy_id]
        return fired
