"""Handle one `queue:orders` entry: lock, state machine, broker, one commit.

Per entry: dead-letter it if malformed or delivered too often; otherwise take
the strategy's lock (which reads the run's snapshot), let
`services.executor.decide` decide (refuse, skip, place/confirm, abort; on the
rare paths it asks for the broker's entry order first), do the I/O it asks
for, build the outcome (`services.executor.outcome`: retry, fail, abort),
write it with one commit script (runtime + control + log row + ack), and for
a run that ended, unload it before acking. See `services.executor` for the
delivery contract this implements.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from libs.broker.kite import BrokerError, api_key_fingerprint
from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.models import (
    AbortEvent,
    BrokerOrder,
    Event,
    EventType,
    MalformedEvent,
    OrderLogStatus,
    RetryEvent,
    StrategyConfig,
    TransactionType,
    event_to_json,
    parse_event,
)
from libs.service.logging import get_logger
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import plan_run, schedule_event, unload_run
from libs.trading.tags import intent_of, order_tag
from libs.trading.tokens import mirror_expired
from services.executor import metrics
from services.executor import outcome as outcomes
from services.executor.credentials import CredentialStore, CredentialsUnavailable, KiteCredentials
from services.executor.decide import (
    Action,
    EntryOrder,
    Failure,
    Settlement,
    Snapshot,
    broker_failure,
    decide,
    kind_of,
    runtime_of,
    settle,
)
from services.executor.halt import OperatorHalt
from services.executor.notices import outcome_notice
from services.executor.outcome import Outcome
from services.executor.placement import OrderPlacer
from services.executor.ratelimit import RateLimitTimeout
from services.executor.settings import ExecutorSettings
from services.executor.state import Held, OrderState

EXIT_ATTEMPT_TTL_S = keys.RUN_MARKER_TTL_S  # longer than any run, and the run_id scopes it
ACCOUNT_CHANGED = "broker account changed since start"


class AccountChanged(CredentialsUnavailable):
    """`broker:{user}` now holds another Kite account than the run started on."""


class Refused(Exception):
    """The event is not one this run's own schedule, listener or user produced: dead-letter it, place nothing."""


CONFIG_CACHE_MAX = 100_000
DECIDE_STEPS_MAX = 5  # decide() asks for each fact at most once: a bound, never reached
LATE_ENTRY = "checking a late entry order"


class OrderHandler:
    """Turn one stream entry into at most one broker order and exactly one log row."""

    def __init__(self, settings: ExecutorSettings, redis: Redis, state: OrderState, credentials: CredentialStore,
                 placer: OrderPlacer, calendar: MarketCalendar) -> None:
        self.settings, self.redis, self.state = settings, redis, state
        self.credentials, self.placer, self.calendar = credentials, placer, calendar
        self.log = get_logger("executor")
        self.processed = 0
        self.failed = 0
        # Parsed `strategy:{id}` by its bytes, and each strategy's owner (to read
        # the credentials together with the lock); bounded, cleared when full.
        self._configs: dict[str, tuple[bytes, StrategyConfig]] = {}
        self._owners: dict[str, str] = {}
        self.halt = OperatorHalt(redis)

    async def handle_entry(self, msg_id: str, fields: dict[bytes, bytes], deliveries: int,
                           partition: int = 0) -> bool:
        """Handle one entry of `partition`'s stream; return True once it is acked (False leaves it pending)."""
        raw = fields.get(b"event")
        if deliveries > self.settings.max_deliveries:
            return await self._dead(msg_id, raw or b"", f"delivered {deliveries} times "
                                    f"(limit {self.settings.max_deliveries})", deliveries, partition)
        if raw is None:
            return await self._dead(msg_id, b"", "entry has no `event` field", deliveries, partition)
        try:
            event = parse_event(raw)
        except MalformedEvent as error:
            return await self._dead(msg_id, raw, f"malformed event: {error.reason}", deliveries, partition)
        if keys.partition_of(event.strategy_id) != partition:
            # Every producer writes an event to its strategy's partition; one found elsewhere
            # (N changed without draining) cannot be committed in one slot with its run's keys.
            return await self._dead(msg_id, raw, f"event of partition {keys.partition_of(event.strategy_id)} "
                                    f"found in partition {partition}'s stream", deliveries, partition)
        sid = str(event.strategy_id)
        log = self.log.bind(strategy_id=sid, event_type=event.event_type.value, attempt=event.attempt, msg_id=msg_id)
        # One round trip takes the lock and reads all the state machine needs,
        # the owner's credentials included when an earlier event named the owner.
        owner = self._owners.get(sid)
        entry = kind_of(event) is EventType.BUY
        async with self.state.locked_read(sid, event.run_id, owner, self._order_slot(event, deliveries, owner),
                                          EXIT_ATTEMPT_TTL_S, _intent_marker(event), entry=entry) as held:
            try:
                outcome, config = await self.decide(event, deliveries, log, held)
            except Refused as refusal:
                # No ABORT with it: a forged event must not end the real run either.
                await self.state.dead_letter(msg_id, raw, f"refused: {refusal}", deliveries, partition=partition)
                metrics.DEAD_LETTERS.labels(stream=keys.ORDERS_DEAD_STREAM).inc()
                log.error("event refused and dead-lettered", reason=str(refusal))
                return True
            await self.finish(event, msg_id, outcome, config, log, held)
        return True

    async def _dead(self, msg_id: str, raw: bytes, reason: str, deliveries: int, partition: int = 0) -> bool:
        # A given-up event of the loaded run would leave it stuck (a position with no exit
        # left, `strategy:{id}` making start/delete answer 409): the dead letter queues an
        # ABORT of that run in the same step. Not for a dead ABORT: that would loop.
        event = _event_or_none(raw)
        if event is not None and keys.partition_of(event.strategy_id) != partition:
            event = None  # its run's keys are in another slot: no ABORT from here
        abort = None
        if event is not None and not isinstance(event, AbortEvent):
            kind = kind_of(event)
            intent = intent_of(kind.value)
            tag = order_tag(event.strategy_id, event.run_id, event.trading_day, intent)
            abort = outcomes.abort_event(event, f"{kind.value} event dead-lettered ({reason}); position may be open "
                                             f"(its {intent} order {tag} may be at the broker): check Kite and "
                                             f"square off by hand if a position is held")
        aborted = await self.state.dead_letter(
            msg_id, raw, reason, deliveries,
            (str(event.strategy_id), event.run_id, event_to_json(abort)) if event is not None and abort else None,
            partition=partition)
        metrics.DEAD_LETTERS.labels(stream=keys.ORDERS_DEAD_STREAM).inc()
        self.log.error("entry dead-lettered", msg_id=msg_id, reason=reason, deliveries=deliveries,
                       strategy_id=str(event.strategy_id) if event is not None else None, run_aborted=aborted)
        if aborted and abort is not None:
            self.log.error("run aborted after its event was dead-lettered: a position may be open; a human must "
                           "check the tag in Kite and square off by hand", strategy_id=str(abort.strategy_id),
                           reason=abort.reason)
        elif isinstance(event, AbortEvent):
            self.log.error("ABORT dead-lettered: the run may still be loaded and a position may be open; a human "
                           "must stop the strategy, check Kite and square off by hand",
                           strategy_id=str(event.strategy_id), reason=event.reason)
        return True

    def _order_slot(self, event: Event, deliveries: int, owner: str | None) -> tuple[str, str, list[Any]] | None:
        """For a plain order (first attempt, first delivery), ask for its order slot with the lock.

        The stop-loss path and a new run's entry then send right after the one
        round trip that locks and reads; the script takes the slot only in the
        cases that send without a tag lookup (see services.executor.state), the
        placement uses it only while fresh.
        """
        if event.event_type not in (EventType.BUY, EventType.SELL, EventType.STOPLOSS) or event.attempt > 1 \
                or deliveries > 1:
            return None
        fp = self.credentials.fingerprint_hint(owner) if owner is not None else None
        if fp is None:
            return None
        key, args = self.placer.limiter.slot_request(fp)
        return fp, key, args

    def remember(self, configs: Iterable[StrategyConfig]) -> None:
        """Note the owners of loaded runs (from reconciliation), so their first event reads credentials with the lock."""
        for config in configs:
            self._owners[str(config.strategy_id)] = str(config.user_id)

    def prime(self, parsed: Iterable[tuple[bytes, StrategyConfig]]) -> None:
        """Keep configs parsed ahead of their run's first event (from `started` messages), with their owners."""
        for raw, config in parsed:
            self._keep(str(config.strategy_id), raw, config)

    def _config(self, sid: str, raw: bytes | None) -> StrategyConfig | None:
        """Parse `strategy:{id}`, reusing the last parse while the stored bytes are unchanged."""
        if not raw:
            return None
        hit = self._configs.get(sid)
        if hit is not None and hit[0] == raw:
            return hit[1]
        config = StrategyConfig.model_validate_json(raw)
        self._keep(sid, raw, config)
        return config

    def _keep(self, sid: str, raw: bytes, config: StrategyConfig) -> None:
        if len(self._configs) >= CONFIG_CACHE_MAX:
            self._configs.clear()
            self._owners.clear()
        self._configs[sid] = (raw, config)
        self._owners[sid] = str(config.user_id)

    async def _credentials(self, config: StrategyConfig, held: Held | None) -> KiteCredentials:
        user_id = str(config.user_id)
        fields = held.credentials if held is not None and held.credentials_user == user_id else None
        creds = await self.credentials.get(user_id, fields)
        # Second guard behind the API (which refuses account changes while running): the
        # run's orders and tag lookups belong to the account it started on, never another.
        if config.api_key_fp and api_key_fingerprint(creds.api_key) != config.api_key_fp:
            raise AccountChanged(ACCOUNT_CHANGED)
        return creds

    async def decide(self, event: Event, deliveries: int, log: Any,
                     held: Held) -> tuple[Outcome, StrategyConfig | None]:
        """Return what to do with the event and the loaded config of its run (if any).

        `held` carries what was read when the lock was taken (the lock keeps it
        current). `services.executor.decide` decides; this gathers the facts it
        asks for (the broker's entry order, the stream's pending BUY) and does the I/O.
        """
        config = self._config(str(event.strategy_id), held.raw_config)
        position, held_quantity = runtime_of(held.runtime)
        kind = kind_of(event)
        snap = Snapshot(config, position, datetime.now(UTC), deliveries=deliveries,
                        exit_attempted=held.exit_attempted, entry_unsent=held.entry_unsent,
                        intent_marked=held.intent_marked,
                        halt=await self.halt.reason() if kind is EventType.BUY else None)
        creds: KiteCredentials | None = None
        for _ in range(DECIDE_STEPS_MAX):
            decision = decide(event, snap, early_tolerance_s=self.settings.event_early_tolerance_s)
            action = decision.action
            # Only the loaded run is placed for or asked about (decide() skips the rest): config is set.
            if action is Action.PLACE_ENTRY or action is Action.PLACE_EXIT:
                if snap.entry is not None and action is Action.PLACE_EXIT:
                    log.warning("runtime lost a filled entry; exiting per the broker",
                                entry_order=snap.entry.order and snap.entry.order.get("order_id"))
                return await self.place(event, kind, config, decision.lookup, log, held, held_quantity), config
            if action is Action.SKIP:
                if decision.clear_stoploss_marker:
                    await self.redis.delete(keys.stoploss_marker_key(event.strategy_id, event.run_id))
                return outcomes.skip(event, decision, config, log), config
            if action is Action.REFUSE:
                raise Refused(decision.reason)
            if action is Action.ABORT_RUN:
                return outcomes.abort_run(event, decision, config, log, held_quantity), config
            if action is Action.WAIT_FOR_ENTRY:
                return outcomes.wait_for_entry(event, kind, log), config
            request = {"event": event.model_dump(mode="json")}
            if action is Action.CHECK_ENTRY_PENDING:
                snap = replace(snap, entry_pending=await self.state.entry_pending(str(config.strategy_id),
                                                                                  config.run_id))
            elif action is Action.LOOK_UP_ENTRY:
                entry_tag = order_tag(config.strategy_id, config.run_id, event.trading_day, "entry")
                try:
                    creds = await self._credentials(config, held)
                    entry = await self.placer.find_by_tag(creds, entry_tag, accept_dead=False)
                except (BrokerError, CredentialsUnavailable) as error:
                    if isinstance(error, AccountChanged) and kind is not EventType.BUY:
                        return outcomes.account_changed(event, request, str(error), None, log), config
                    checking = LATE_ENTRY if kind is EventType.BUY else "checking the entry order"
                    return self._retry(event, kind, request, {"error": str(error), "while": checking}, None,
                                       log), config
                snap = replace(snap, entry=EntryOrder(entry))
            elif action is Action.CANCEL_ENTRY:  # asked only after LOOK_UP_ENTRY found a live entry
                live = snap.entry.order
                log.warning("entry order still open at sell time; cancelling it", entry_order=live.get("order_id"),
                            entry_status=live.get("status"))
                try:
                    ended = await self.placer.cancel(creds, live)
                except BrokerError as error:
                    return self._retry(event, kind, request, {
                        "error": str(error), "while": "cancelling the open entry order",
                        "entry_order": live.get("order_id")}, None, log), config
                snap = replace(snap, entry=EntryOrder(ended.broker_order, cancelled=ended.order_id))
        raise RuntimeError(f"no decision for {event.event_type.value} after {DECIDE_STEPS_MAX} steps")

    async def place(self, event: Event, kind: EventType, config: StrategyConfig, lookup: bool, log: Any,
                    held: Held | None = None, held_quantity: int | None = None) -> Outcome:
        """Place (or find) the order of this event and turn the result into an outcome.

        An exit sells `held_quantity` (runtime's count of shares held; the config's
        quantity for a run from before it was kept), or what the book shows when it looks first.
        """
        tag = order_tag(config.strategy_id, config.run_id, event.trading_day, intent_of(kind.value))
        side = TransactionType.BUY if kind is EventType.BUY else TransactionType.SELL
        quantity = config.quantity if kind is EventType.BUY or not held_quantity else held_quantity
        order = BrokerOrder(symbol=config.symbol, quantity=quantity, transaction_type=side,
                            exchange=config.exchange, product=config.product, tag=tag)
        request: dict[str, Any] = {"order": order.model_dump(mode="json"), "attempt": event.attempt}
        if isinstance(event, RetryEvent):
            request["retry_of"] = kind.value  # only a retry is a retry of something
        log = log.bind(tag=tag)
        try:
            creds = await self._credentials(config, held)
            # An exit marks its attempt (with its rate-limit slot, right before sending).
            mark = None if kind is EventType.BUY else \
                (keys.exit_attempt_key(config.strategy_id, config.run_id), EXIT_ATTEMPT_TTL_S)
            slot = held.slot if held is not None and held.slot_fp == creds.api_key_fp else None
            guard = held.ensure_held if held is not None else None
            if kind is EventType.BUY:
                result = await self.placer.execute(creds, order, lookup_first=lookup, accept_dead=True, slot=slot,
                                                   guard=guard)
            else:
                entry_tag = order_tag(config.strategy_id, config.run_id, event.trading_day, "entry")
                result = await self.placer.execute_exit(creds, order, entry_tag=entry_tag, lookup_first=lookup,
                                                        mark=mark, slot=slot, guard=guard)
        except AccountChanged as error:
            return outcomes.account_changed(event, request, str(error), tag, log)
        except CredentialsUnavailable as error:
            return outcomes.abort_now(event, request, {"error": str(error)}, tag, log)
        except BrokerError as error:
            failure = broker_failure(kind, error.kind)
            if failure is Failure.AUTH:
                await mirror_expired(self.redis, config.user_id, creds.token_ct)
                return outcomes.abort_now(event, request, error.as_payload(), tag, log, auth=True)
            if failure is Failure.ENTRY_REFUSED:
                return outcomes.fail_run(config, request, error.as_payload(), tag, None,
                                         f"entry order refused: {error.message}", log)
            log.warning("order attempt failed", error_kind=error.kind.value, error=error.message)
            return self._retry(event, kind, request, error.as_payload(), tag, log)
        except RateLimitTimeout as error:
            return self._retry(event, kind, request, {"error": str(error)}, tag, log)
        log = log.bind(order_id=result.order_id)
        if kind is not EventType.BUY and result.broker_order.get("quantity"):
            # An exit that looked first sent what the book showed held, not runtime's count.
            request["order"]["quantity"] = int(result.broker_order["quantity"])
        settlement = settle(kind, result)
        if settlement is Settlement.FILLED:
            return outcomes.filled(event, kind, config, request, result, log)
        if settlement is Settlement.EXIT_PARTLY_FILLED:
            return outcomes.exit_partly_filled(event, kind, request, result, self.settings, log)
        if settlement is Settlement.ENTRY_FAILED:
            return outcomes.fail_run(config, request, result.payload(), tag, result.order_id,
                                     f"entry order {result.status}: {result.status_message}", log)
        log.error("exit order not filled; position still open, retrying", status=result.status,
                  status_message=result.status_message)
        return self._retry(event, kind, request, result.payload(), tag, log)

    def _retry(self, event: Event, kind: EventType, request: dict[str, Any], response: dict[str, Any],
               tag: str | None, log: Any) -> Outcome:
        return outcomes.retry_or_abort(event, kind, request, response, tag, self.settings, log)

    async def finish(self, event: Event, msg_id: str, outcome: Outcome, config: StrategyConfig | None,
                     log: Any, held: Held | None = None) -> None:
        """Write the outcome (one commit), unload an ended run, then ack (releasing `held` with the ack)."""
        user_id = config.user_id if config is not None and config.run_id == event.run_id else None
        row = outcome.row(event, user_id, msg_id)
        if outcome.retry is not None:
            # Before the commit: a crash in between redelivers the entry, which
            # schedules the same (deterministic) member again instead of losing it.
            await schedule_event(self.redis, *outcome.retry)
        ended = outcome.unload
        await self.state.commit(
            strategy_id=str(event.strategy_id), run_id=event.run_id, row=dumps(row), runtime_fields=outcome.runtime,
            control=dumps(outcome.control) if outcome.control else None,
            abort_event=event_to_json(outcome.abort) if outcome.abort else None,
            ack_msg_id=None if ended is not None else msg_id, held=held,
            notice=outcome_notice(event, outcome, config, row, held.runtime if held is not None else {}))
        if ended is not None:
            plan = plan_run(ended, self.calendar, datetime.fromisoformat(ended.run_id))
            await unload_run(self.redis, ended, plan)
            await self.state.ack(msg_id, held, strategy_id=str(event.strategy_id))
        self.processed += 1
        if outcome.status == OrderLogStatus.failed:
            self.failed += 1
        metrics.EVENTS.labels(event_type=event.event_type.value, outcome=outcome.outcome_label).inc()
        skip = {"skipped": outcome.response.get("skipped")} if outcome.status == OrderLogStatus.skipped else {}
        # Debug for a placed or skipped event: an info line per order costs the hot path
        # ~0.1 ms (the redacting renderer); failures were logged loudly where they arose.
        emit = log.info if outcome.status == OrderLogStatus.failed else log.debug
        emit("event handled", status=outcome.status.value, order_id=outcome.order_id, tag=outcome.tag,
             strategy_status=outcome.strategy_status, **skip, **outcome.extra_log)


def _intent_marker(event: Event) -> str | None:
    """Return the marker key that proves an exit was asked for: the listener's or the API's."""
    kind = kind_of(event)
    if kind is EventType.STOPLOSS:
        return keys.stoploss_marker_key(event.strategy_id, event.run_id)
    if event.metadata.get("square_off"):
        return keys.square_off_marker_key(event.strategy_id, event.run_id)
    return None


def _event_or_none(raw: bytes) -> Event | None:
    try:
        return parse_event(raw) if raw else None
    except MalformedEvent:
        return None
