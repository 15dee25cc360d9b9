"""What handling one event decided: the log row, runtime change and follow-ups.

An Outcome is built here from a decision (see `services.executor.decide`) and
the broker's answer, and written by one commit script, so the row, the runtime
fields, the control message and any ABORT or RETRY event land in Redis together.
The builders log the loud cases (failures, aborts) where they arise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from libs.broker.kite import filled_quantity
from libs.schema import keys
from libs.schema.models import (
    AbortEvent,
    ControlMessage,
    Event,
    EventType,
    LastAction,
    OrderLogRow,
    OrderLogStatus,
    Position,
    RetryEvent,
    RuntimeState,
    StoplossEvent,
    StrategyConfig,
    StrategyStatus,
    order_log_id,
)
from libs.service.backoff import backoff_delay
from libs.trading.tokens import SESSION_EXPIRED_REASON
from services.executor import metrics
from services.executor.decide import Decision, exit_status, give_up_reason
from services.executor.placement import OrderResult
from services.executor.settings import ExecutorSettings

ENTRY_WAIT_S = 1.0  # an exit waiting for its run's pending entry looks again this often


@dataclass
class Outcome:
    """The result of handling one event (exactly one order-log row)."""

    status: OrderLogStatus
    request: dict[str, Any]
    response: dict[str, Any]
    tag: str | None = None
    order_id: str | None = None
    runtime: dict[str, str] | None = None
    control: ControlMessage | None = None
    strategy_status: StrategyStatus | None = None
    failure_reason: str | None = None
    unload: StrategyConfig | None = None
    abort: AbortEvent | None = None
    retry: tuple[RetryEvent, int] | None = None
    extra_log: dict[str, Any] = field(default_factory=dict)

    @property
    def outcome_label(self) -> str:
        if self.abort is not None or self.strategy_status is StrategyStatus.failed:
            return "aborted" if self.abort is not None else "failed"
        if self.retry is not None:
            return "retry"
        return self.status.value

    def row(self, event: Event, user_id: Any, msg_id: str) -> OrderLogRow:
        """Return the order-log row of this outcome; its id is derived from the stream entry."""
        return OrderLogRow(
            # The entry is in its strategy's partition's stream: ids are unique per stream.
            id=order_log_id(keys.orders_stream(keys.partition_of(event.strategy_id)), msg_id),
            strategy_id=event.strategy_id, user_id=user_id,
            event_type=event.event_type, request_payload=self.request, response_payload=self.response,
            status=self.status, trading_day=event.trading_day, broker_order_id=self.order_id, tag=self.tag,
            stream_msg_id=msg_id, created_at=datetime.now(UTC), run_id=event.run_id,
            strategy_status=self.strategy_status, failure_reason=self.failure_reason,
        )


def skipped(event: Event, reason: str, **extra: Any) -> Outcome:
    """Return a skip: acked with a row, nothing sent to the broker."""
    return Outcome(OrderLogStatus.skipped, request={"event": event.model_dump(mode="json")},
                   response={"skipped": reason, **extra})


def skip(event: Event, decision: Decision, config: StrategyConfig | None, log: Any) -> Outcome:
    """Return the skip the decision asks for (ending the run if it says so)."""
    out = skipped(event, decision.reason, **decision.extra)
    if decision.unload:
        out.unload = config
    out.strategy_status, out.failure_reason = decision.strategy_status, decision.failure_reason
    if decision.failure_reason is not None:
        log.error("run ends without trading", reason=decision.failure_reason)
    return out


def wait_for_entry(event: Event, kind: EventType, log: Any) -> Outcome:
    """Schedule this exit again shortly (same attempt: waiting is not a failed try)."""
    waits = int(event.metadata.get("entry_waits", 0)) + 1
    retry = RetryEvent(strategy_id=event.strategy_id, run_id=event.run_id, trading_day=event.trading_day,
                       attempt=event.attempt, retry_of=kind, price=event.price, trigger_time=event.trigger_time,
                       metadata={**event.metadata, "entry_waits": waits})
    log.warning("exit waits for its run's pending entry", entry_waits=waits)
    request = {"event": event.model_dump(mode="json")}
    return Outcome(OrderLogStatus.skipped, request, {"skipped": "the run's entry is still pending in the queue; "
                   "waiting for its outcome", "entry_waits": waits},
                   retry=(retry, int(time.time() * 1000 + ENTRY_WAIT_S * 1000)))


def filled(event: Event, kind: EventType, config: StrategyConfig, request: dict[str, Any], result: OrderResult,
           log: Any) -> Outcome:
    """Record a confirmed fill: new position, control message, and the run's end on an exit."""
    now = datetime.now(UTC)
    if kind is EventType.BUY:
        # What the broker filled is held, even if the rest was cancelled or rejected.
        position = Position.bought
        fields = RuntimeState.hash_fields(position=position, last_buy_order=result.order_id,
                                          last_price=result.average_price, last_action=LastAction.BUY,
                                          updated_at=now, filled_quantity=filled_quantity(result.broker_order))
    else:
        position = Position.exited_by_sl if kind is EventType.STOPLOSS else Position.sold
        fields = RuntimeState.hash_fields(position=position, last_sell_order=result.order_id,
                                          last_price=result.average_price, last_action=kind.value,
                                          updated_at=now, filled_quantity=0)
    control = ControlMessage(action="position", strategy_id=config.strategy_id, symbol=config.symbol,
                             stop_loss=config.stop_loss, position=position, run_id=config.run_id)
    response = result.payload()
    if kind is EventType.BUY and result.partially_filled:
        response.update(partial_fill=True, requested_quantity=request["order"]["quantity"])
        log.warning("entry partly filled; holding what filled", status=result.status,
                    requested_quantity=request["order"]["quantity"], filled_quantity=result.filled_quantity)
    out = Outcome(OrderLogStatus.success, request, response, tag=result.broker_order.get("tag")
                  or request["order"]["tag"], order_id=result.order_id, runtime=fields, control=control)
    if kind is not EventType.BUY:
        out.unload, out.strategy_status = config, exit_status(event)
    # Logged once, with the outcome, by the handler ("event handled"): one line per event.
    out.extra_log = {"position": position.value, "price": result.average_price,
                     "found_by_tag": result.found_by_tag}
    return out


def exit_partly_filled(event: Event, kind: EventType, request: dict[str, Any], result: OrderResult,
                       settings: ExecutorSettings, log: Any) -> Outcome:
    """Keep `bought` with the shares still held, and retry the exit for them (looked up first)."""
    remaining = result.remaining or 0
    log.error("exit order partly filled; retrying for the remainder", status=result.status,
              filled_quantity=result.filled_quantity, remaining=remaining)
    response = {**result.payload(), "partial_fill": True, "remaining_quantity": remaining}
    out = retry_or_abort(event, kind, request, response, result.broker_order.get("tag"), settings, log)
    out.order_id = result.order_id
    # Same commit as the row: the count held follows the broker's fills, position stays bought.
    out.runtime = RuntimeState.hash_fields(position=Position.bought, filled_quantity=remaining,
                                           last_sell_order=result.order_id, updated_at=datetime.now(UTC))
    return out


def fail_run(config: StrategyConfig, request: dict[str, Any], response: dict[str, Any], tag: str | None,
             order_id: str | None, reason: str, log: Any) -> Outcome:
    """End the run as failed now (a refused entry: nothing is held)."""
    metrics.ABORTS.labels(kind="entry_rejected").inc()
    log.error("strategy failed", reason=reason)
    return Outcome(OrderLogStatus.failed, request, response, tag=tag, order_id=order_id,
                   strategy_status=StrategyStatus.failed, failure_reason=reason, unload=config)


def account_changed(event: Event, request: dict[str, Any], reason: str, tag: str | None, log: Any) -> Outcome:
    """Queue an ABORT, placing nothing: the run's broker account is not the one in Redis now."""
    metrics.ABORTS.labels(kind="account_changed").inc()
    log.error("broker account changed since the run started; nothing placed, aborting the run "
              "(any open position is on the old account: a human must square it off there)")
    return Outcome(OrderLogStatus.failed, request, {"error": reason}, tag=tag, abort=abort_event(event, reason))


def abort_now(event: Event, request: dict[str, Any], response: dict[str, Any], tag: str | None, log: Any, *,
              auth: bool = False) -> Outcome:
    """Queue an ABORT for the run (credentials or, with `auth`, the token refused): retrying cannot help."""
    detail = response.get("message") or response.get("error")
    reason = f"{SESSION_EXPIRED_REASON} (broker: {detail})" if auth else \
        f"broker refused the credentials: {detail}"
    log.error("broker credentials refused; aborting the run", reason=reason)
    return Outcome(OrderLogStatus.failed, request, response, tag=tag, abort=abort_event(event, reason))


def retry_or_abort(event: Event, kind: EventType, request: dict[str, Any], response: dict[str, Any],
                   tag: str | None, settings: ExecutorSettings, log: Any) -> Outcome:
    """Schedule a RETRY with backoff and jitter, or past the limit queue an ABORT."""
    reason = give_up_reason(kind, event.attempt, settings.retry_max_attempts, response)
    if reason is not None:
        log.error("retries exhausted; aborting the run", reason=reason)
        return Outcome(OrderLogStatus.failed, request, {**response, "aborting": True}, tag=tag,
                       abort=abort_event(event, reason))
    attempt = event.attempt + 1
    delay = backoff_delay(event.attempt, base=settings.retry_base_s, cap=settings.retry_cap_s, jitter=True)
    metadata = dict(event.metadata)
    if isinstance(event, StoplossEvent):
        metadata["trigger_price"] = event.trigger_price
    retry = RetryEvent(strategy_id=event.strategy_id, run_id=event.run_id, trading_day=event.trading_day,
                       attempt=attempt, retry_of=kind, price=event.price, trigger_time=event.trigger_time,
                       metadata=metadata)
    metrics.RETRIES.labels(event_type=kind.value).inc()
    log.warning("retry scheduled", next_attempt=attempt, delay_s=round(delay, 3))
    return Outcome(OrderLogStatus.failed, request, {**response, "retry_attempt": attempt,
                   "retry_in_s": round(delay, 3)}, tag=tag,
                   retry=(retry, int(time.time() * 1000 + delay * 1000)))


def abort_event(event: Event, reason: str) -> AbortEvent:
    """Return the ABORT of the event's run (a square-off's keeps its mark: the user's stop stays)."""
    metadata = {k: v for k, v in event.metadata.items() if k == "square_off"}
    return AbortEvent(strategy_id=event.strategy_id, run_id=event.run_id, trading_day=event.trading_day,
                      attempt=event.attempt, reason=reason[:500], metadata=metadata)


def abort_run(event: Event, decision: Decision, config: StrategyConfig | None, log: Any,
              held_quantity: int | None = None) -> Outcome:
    """Fail the run: unload it (if still loaded) and record why, loudly."""
    metrics.ABORTS.labels(kind="abort_event").inc()
    out = Outcome(OrderLogStatus.failed, {"event": event.model_dump(mode="json")}, {"aborted": decision.reason},
                  failure_reason=decision.failure_reason, strategy_status=decision.strategy_status,
                  unload=config if decision.unload else None)
    if decision.open_position and config is not None:
        log.error("run aborted with the position still open: a human must square it off in Kite",
                  symbol=config.symbol, quantity=held_quantity or config.quantity, reason=decision.reason)
    log.error("strategy run aborted", reason=decision.reason)
    return out
