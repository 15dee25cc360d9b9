"""The market listener's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TICKS = Counter("listener_ticks_total", "Ticks received from the feed.")
TICKS_PER_S = Gauge("listener_ticks_per_second", "Ticks received during the last second.")
TICK_TO_TRIGGER = Histogram(
    "listener_tick_to_trigger_seconds", "From a crossing tick reaching the listener to its STOPLOSS XADD.",
    buckets=(0.0001, 0.0002, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02,
             0.05, 0.1, 0.5))
FIRED = Counter("listener_stoploss_fired_total", "STOPLOSS events emitted.")
ALREADY_FIRED = Counter("listener_stoploss_already_fired_total", "Triggers whose run already had a STOPLOSS.")
RECONNECTS = Counter("listener_feed_reconnects_total", "Watchdog reconnects of the ticker.")
WATCHED = Gauge("listener_watched_strategies", "Bought strategies in the stop-loss index.")
