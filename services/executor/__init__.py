"""Executor: turn `queue:orders` events into broker orders, exactly once at the broker.

Delivery contract. The stream delivers at least once (XREADGROUP in group
`executors`; entries of a dead consumer are XAUTOCLAIMed after an idle
timeout; redelivery after any crash). The broker sees each order intent at
most once, because:

1. Lock: `lock_state:{id}` (SET NX PX with an owner token, renewed while held,
   released by compare-and-delete) serialises all work on one strategy across
   every executor replica. Renewal survives Redis errors; a lock known lost
   (taken over, or not renewed for a whole TTL) stops any order not yet sent.
2. State machine: `runtime:{id}.position` admits BUY only from `none` and
   SELL/STOPLOSS only from `bought`; a duplicate or late event is acked as
   `skipped` with a log row and never reaches the broker.
3. Deterministic tags: every order carries `order_tag(strategy, run, day,
   entry|exit)`; SELL, STOPLOSS and square-off share the exit tag, so one run
   has at most one live exit order (see 6 for exits that partly fill).
4. Tag lookup when in doubt: before an entry order, on every retry or
   redelivered entry, and after any ambiguous failure (timeout, 5xx, reset)
   the day's order book is searched for the tag; a live or filled order found
   there is confirmed instead of placing another. The one entry sent without
   looking is the first delivery of a run's first entry event that deletes
   the run's `entry:unsent` key, written when the start made the run (a new
   run_id has nothing at the broker); a rebuild never writes it, and after
   Redis may have lost writes (a new server identity, a lost group) every such
   key is deleted before consuming again, since a lost DEL would bring one back. An exit that finds position
   `none` asks the broker for a filled entry before skipping (runtime may have
   been lost with Redis); a SELL that finds the entry still live cancels it
   and ends the run only once the broker shows it cancelled (or exits it, if
   it filled meanwhile).
5. Fill before state: order history is polled until COMPLETE / REJECTED /
   CANCELLED before `position` changes; an unconfirmed fill is ambiguous and
   retried through the tag lookup.
6. Held quantity: exits sell the shares held, never the configured quantity.
   `runtime.filled_quantity` is written in the same commit as `position`
   from the broker's confirmed fills (an entry that ends CANCELLED/REJECTED
   after a partial fill is `bought` with what filled). The exit tag stays one
   per run (a per-attempt tag would need a counter that Redis can lose); an
   exit that partly fills and ends keeps `bought` with the remainder, and its
   retry looks first: one order book read gives the entry tag's fills minus
   the fills of every ended order under the exit tag. A live exit order is
   confirmed, never placed beside; only when every exit order has ended is
   the remainder placed, so the shares sold sum to at most the shares bought,
   whatever crashed or was redelivered in between (under the lock, and the
   book is read after the last order under the tag ended). An ambiguous send
   is searched among the exit orders not in that read. The first plain exit
   skips the read (stop-loss latency) only while no exit was ever attempted
   (the exit marker, set with its rate-limit slot), when nothing was sold.
7. Ack last: the runtime update, its control message, the order-log row and
   any follow-up ABORT are one Lua commit; the entry is acked in that commit,
   or (when the run ended) right after the run is unloaded. A crash anywhere
   before the ack redelivers the entry, and 1-5 make the redelivery harmless;
   the row id is derived from the entry, so the Postgres writer keeps one.

Failures: RETRYABLE/AMBIGUOUS broker errors (after the tag lookup) become a
RETRY event in `schedule` with exponential backoff and jitter; past
`retry_max_attempts` an ABORT event fails the run. A rejected BUY fails the
run at once; a rejected exit retries, then aborts loudly (the position stays
open, and the log says what a human must do). A refused token (AUTH) aborts.
Malformed entries and entries delivered more than `max_deliveries` times go
to `queue:orders:dead` with their reason before they are acked; a dead event
of the loaded run (other than an ABORT, which would loop) queues an ABORT of
that run in the same step, so the run is never left stuck.

Redis is rebuilt from the broker: at start and whenever Redis lost state (its
run_id changed, or the consumer group vanished) runtime is reconciled from
the order book by tag before consuming again. The order-log writer (group
`log-writers`) runs in this process as its own task and is the only part that
touches Postgres; Postgres down never stops trading. Per Kite api_key, orders
are rate-limited across replicas by a shared Redis window.
"""
