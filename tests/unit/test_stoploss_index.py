"""The stop-loss index on its own: which watches a price crosses, and that each fires once."""

from __future__ import annotations

from datetime import date

import pytest

from services.market_listener.index import StopLossIndex, Watch

DAY = date(2026, 3, 2)


def _watch(sid: str, stop_loss: float, symbol: str = "INFY", run_id: str = "run-1") -> Watch:
    return Watch(stop_loss, sid, run_id, DAY, symbol)


def _index(*watches: Watch) -> StopLossIndex:
    index = StopLossIndex()
    for watch in watches:
        index.add(watch)
    return index


@pytest.mark.parametrize(("price", "fires"), [(1400.05, False), (1400.0, True), (1399.95, True)])
def test_a_watch_fires_at_or_below_its_stop_and_not_above(price: float, fires: bool) -> None:
    watch = _watch("a", 1400.0)
    index = _index(watch)
    assert index.pop_triggered("INFY", price) == ([watch] if fires else [])
    assert ("a" in index) is not fires
    assert len(index) == (0 if fires else 1)


def test_a_fired_watch_leaves_the_index_and_never_fires_again() -> None:
    index = _index(_watch("a", 1400.0))
    assert [w.strategy_id for w in index.pop_triggered("INFY", 1390.0)] == ["a"]
    assert index.pop_triggered("INFY", 1380.0) == []
    assert index.pop_triggered("INFY", 1.0) == []
    assert "INFY" not in index.by_symbol  # an emptied symbol costs nothing on its next tick
    assert index.remove("a") is False


def test_many_runs_on_one_symbol_fire_exactly_those_at_or_above_the_price() -> None:
    stops = [1410.0, 1420.0, 1430.0, 1440.0, 1450.0]
    index = _index(*(_watch(f"s{i}", stop) for i, stop in enumerate(stops)))
    fired = index.pop_triggered("INFY", 1430.0)
    assert sorted(w.strategy_id for w in fired) == ["s2", "s3", "s4"]
    assert len(index) == 2
    assert [w.strategy_id for w in index.pop_triggered("INFY", 1415.0)] == ["s1"]
    assert [w.strategy_id for w in index.pop_triggered("INFY", 1000.0)] == ["s0"]
    assert len(index) == 0


def test_runs_with_the_same_stop_all_fire() -> None:
    index = _index(_watch("a", 1400.0), _watch("b", 1400.0), _watch("c", 1399.0))
    assert sorted(w.strategy_id for w in index.pop_triggered("INFY", 1400.0)) == ["a", "b"]
    assert "c" in index


def test_a_tick_fires_only_its_own_symbol() -> None:
    index = _index(_watch("infy", 1400.0, "INFY"), _watch("tcs", 3500.0, "TCS"))
    assert [w.strategy_id for w in index.pop_triggered("TCS", 1000.0)] == ["tcs"]
    assert "infy" in index and "tcs" not in index


def test_symbols_with_no_runs_fire_nothing() -> None:
    index = _index(_watch("a", 1400.0, "INFY"))
    assert index.pop_triggered("WIPRO", 1.0) == []
    assert StopLossIndex().pop_triggered("INFY", 0.0) == []
    assert len(index) == 1


def test_updating_a_watch_replaces_its_stop() -> None:
    index = _index(_watch("a", 1400.0))
    index.add(_watch("a", 1300.0, run_id="run-2"))  # a new stop (or a new run) of the same strategy
    assert len(index) == 1
    assert index.pop_triggered("INFY", 1350.0) == []
    (fired,) = index.pop_triggered("INFY", 1300.0)
    assert fired.stop_loss == 1300.0 and fired.run_id == "run-2"


def test_updating_a_watch_to_another_symbol_moves_it() -> None:
    index = _index(_watch("a", 1400.0, "INFY"))
    index.add(_watch("a", 3500.0, "TCS"))
    assert "INFY" not in index.by_symbol
    assert index.pop_triggered("INFY", 1.0) == []
    assert [w.strategy_id for w in index.pop_triggered("TCS", 3500.0)] == ["a"]


def test_removing_a_watch_stops_it_firing_and_leaves_the_others() -> None:
    index = _index(_watch("a", 1400.0), _watch("b", 1410.0))
    assert index.remove("b") is True
    assert index.remove("b") is False
    assert index.remove("never-watched") is False
    assert [w.strategy_id for w in index.pop_triggered("INFY", 1390.0)] == ["a"]


def test_a_watch_put_back_after_a_failed_emit_fires_again() -> None:
    watch = _watch("a", 1400.0)
    index = _index(watch)
    (fired,) = index.pop_triggered("INFY", 1390.0)
    index.add(fired)  # Redis refused the trigger: the pump puts the watch back
    assert index.pop_triggered("INFY", 1395.0) == [watch]


def test_the_highest_stop_is_the_last_entry_of_its_symbol() -> None:
    """The pump's one-comparison fast path reads `by_symbol[symbol][-1].stop_loss`."""
    index = _index(_watch("a", 1400.0), _watch("b", 1450.0), _watch("c", 1420.0))
    assert index.by_symbol["INFY"][-1].stop_loss == 1450.0
    index.pop_triggered("INFY", 1450.0)
    assert index.by_symbol["INFY"][-1].stop_loss == 1420.0
