"""Prometheus metrics of the executor and the order-log writer (default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("executor_events_total", "Events handled, by type and outcome.", ["event_type", "outcome"])
ORDER_LATENCY = Histogram(
    "executor_order_seconds", "Broker time of one order: place to confirmed fill.",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
RETRIES = Counter("executor_retries_total", "RETRY events scheduled, by original type.", ["event_type"])
ABORTS = Counter("executor_aborts_total", "Strategy runs aborted (failed), by reason kind.", ["kind"])
DEAD_LETTERS = Counter("executor_dead_letters_total", "Entries moved to a dead-letter stream.", ["stream"])
RATE_WAIT = Histogram("executor_rate_limit_wait_seconds", "Time spent waiting for an order slot.",
                      buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
BOOK_READS = Counter("executor_order_book_reads_total",
                     "Order-book reads to search a tag before placing, confirming or cancelling.", ["intent"])
IN_FLIGHT = Gauge("executor_in_flight", "Events being handled now.")
RECONCILES = Counter("executor_reconciles_total", "Reconciliations run, by trigger.", ["trigger"])
WRITER_ROWS = Counter("order_log_writer_rows_total", "Order-log rows committed to Postgres.")
WRITER_LAG = Gauge("order_log_writer_lag", "Order-log entries not yet committed (pending + unread).")
WRITER_UP = Gauge("order_log_writer_postgres_up", "1 when the last Postgres write succeeded.")
