"""Decide what one `queue:orders` event asks of the executor, from what is known: no I/O.

The handler takes the strategy's lock, which reads the run's snapshot (its
config, `position`, the exit and intent markers), and calls `decide`. Most
events are decided at once: refuse, abort the run, skip with a reason, or
place the entry or the exit. Two rare paths need a fact only the broker or
the stream holds; `decide` then asks for it (LOOK_UP_ENTRY, CANCEL_ENTRY,
CHECK_ENTRY_PENDING), the handler adds the answer to the snapshot and calls
`decide` again. Each fact is asked for at most once, so at most four calls.

`settle` says what a placed order's end means and `broker_failure` what a
broker error means; `give_up_reason` says when retrying is over. Everything
here is a plain call on plain data: no Redis, no broker, no clock (`now` is
in the snapshot), no pydantic validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from libs.broker.kite import TERMINAL, BrokerErrorKind, filled_quantity
from libs.schema.models import (
    AbortEvent,
    Event,
    EventType,
    Position,
    RetryEvent,
    StrategyConfig,
    StrategyStatus,
)
from libs.trading.calendar import MarketCalendar
from services.executor.placement import COMPLETE, OrderResult

EXIT_POSITIONS = frozenset({Position.sold, Position.exited_by_sl})


class Action(StrEnum):
    """What the handler does with an event."""

    REFUSE = "refuse"  # not what the run's schedule, listener or user asked for: dead-letter, no ABORT
    ABORT_RUN = "abort_run"  # an ABORT event: the run fails (unloaded if it is the loaded one)
    SKIP = "skip"  # acked with a log row; nothing reaches the broker
    LOOK_UP_ENTRY = "look_up_entry"  # ask the broker for the run's entry order, then decide again
    CANCEL_ENTRY = "cancel_entry"  # cancel the run's live entry order, then decide again
    CHECK_ENTRY_PENDING = "check_entry_pending"  # ask the stream whether the run's BUY waits, then decide again
    WAIT_FOR_ENTRY = "wait_for_entry"  # schedule this exit again shortly: the run's BUY decides first
    PLACE_ENTRY = "place_entry"  # place (or find by tag) the entry order
    PLACE_EXIT = "place_exit"  # place (or find by tag) the exit order for the shares held


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision and what goes with it."""

    action: Action
    reason: str = ""  # SKIP: the row's `skipped` text; REFUSE and ABORT_RUN: why
    lookup: bool = False  # PLACE_*: search the order book for the tag before sending
    unload: bool = False  # the run is over: unload it after the commit
    strategy_status: StrategyStatus | None = None  # the status the run ends with, if it ends
    failure_reason: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # SKIP: more fields of the row's response
    clear_stoploss_marker: bool = False  # SKIP of a stop-loss of an unloaded run: let the listener fire again
    open_position: bool = False  # ABORT_RUN of the loaded run while shares are held: a human must act


@dataclass(frozen=True, slots=True)
class EntryOrder:
    """What the broker's order book says of the run's entry order (found by its tag)."""

    order: dict[str, Any] | None  # the order that counts (live, filled, or ended with fills), or None
    cancelled: str | None = None  # the id of the entry order this event cancelled


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What is known when deciding: read with the lock, plus the facts `decide` asked for."""

    config: StrategyConfig | None  # the loaded run's config (`strategy:{id}`), if any
    position: Position
    now: datetime
    deliveries: int = 1
    exit_attempted: bool = False  # an exit of this run was attempted before (its marker is set)
    entry_unsent: bool = False  # this entry event deleted the run's unsent-entry key: nothing was sent yet
    intent_marked: bool = False  # the event's intent marker exists (stop-loss fired, square-off asked)
    halt: str | None = None  # the operator halt's reason while halted (read for an entry only)
    entry: EntryOrder | None = None  # None: the broker was not asked yet
    entry_pending: bool | None = None  # None: the stream was not asked yet


# The decisions that carry nothing but their action, made once (a frozen Decision is shared safely).
PLACE_ENTRY = Decision(Action.PLACE_ENTRY)
PLACE_ENTRY_LOOKUP = Decision(Action.PLACE_ENTRY, lookup=True)
PLACE_EXIT = Decision(Action.PLACE_EXIT)
PLACE_EXIT_LOOKUP = Decision(Action.PLACE_EXIT, lookup=True)
LOOK_UP_ENTRY = Decision(Action.LOOK_UP_ENTRY)
CANCEL_ENTRY = Decision(Action.CANCEL_ENTRY)
CHECK_ENTRY_PENDING = Decision(Action.CHECK_ENTRY_PENDING)
WAIT_FOR_ENTRY = Decision(Action.WAIT_FOR_ENTRY)


class Settlement(StrEnum):
    """What a placed (or found) order's end means for the run."""

    FILLED = "filled"  # record the fill: the new position (an exit ends the run)
    EXIT_PARTLY_FILLED = "exit_partly_filled"  # keep `bought` with the remainder; retry the exit
    ENTRY_FAILED = "entry_failed"  # the entry ended with nothing filled: the run fails
    RETRY = "retry"  # the exit ended with nothing filled: retry it


class Failure(StrEnum):
    """What a broker error while placing means."""

    AUTH = "auth"  # the token was refused: abort the run (retrying cannot help)
    ENTRY_REFUSED = "entry_refused"  # the entry was rejected: the run fails now, nothing is held
    RETRY = "retry"  # retry (or abort past the limit)


def kind_of(event: Event) -> EventType:
    """Return the intent of the event: a RETRY's `retry_of`, else its own type."""
    return event.retry_of if isinstance(event, RetryEvent) else event.event_type


def decide(event: Event, snap: Snapshot, *, early_tolerance_s: float) -> Decision:
    """Return what to do with the event, given the snapshot."""
    config = snap.config
    if isinstance(event, AbortEvent):
        ours = config is not None and config.run_id == event.run_id
        return Decision(Action.ABORT_RUN, event.reason, unload=ours,
                        strategy_status=None if event.metadata.get("square_off") else StrategyStatus.failed,
                        failure_reason=event.reason, open_position=ours and snap.position is Position.bought)
    kind = kind_of(event)
    if config is not None and config.run_id != event.run_id and event.event_type in (EventType.BUY, EventType.SELL):
        return Decision(Action.REFUSE, f"{kind.value} names run {event.run_id}, but the loaded run is {config.run_id}")
    if config is None or config.run_id != event.run_id:
        # A stop-loss un-marks the run: if Redis lost it and it is being rebuilt, its listener
        # must be able to fire again once it is reloaded; a run that really ended is not watched.
        return Decision(Action.SKIP, "run not loaded", extra={"loaded_run_id": config.run_id if config else None},
                        clear_stoploss_marker=kind is EventType.STOPLOSS)
    refusal = provenance_refusal(event, kind, config, snap, early_tolerance_s)
    if refusal is not None:
        return Decision(Action.REFUSE, refusal)
    if kind is EventType.BUY:
        return _decide_entry(event, config, snap)
    return _decide_exit(event, kind, snap)


def provenance_refusal(event: Event, kind: EventType, config: StrategyConfig, snap: Snapshot,
                       early_tolerance_s: float) -> str | None:
    """Return why the event is not what the run's schedule, listener or user asked for, or None.

    Anything that can write `queue:orders` could otherwise trade for any user.
    A BUY/SELL (or its RETRY) must carry the run's time of day on a day after the
    run's start (the scheduler's calendar picks which) and not come before it; a
    STOPLOSS needs the listener's fired marker, a square-off the API's marker.
    """
    if kind is EventType.STOPLOSS or event.metadata.get("square_off"):
        if snap.intent_marked:
            return None
        what = "the listener's stop-loss marker" if kind is EventType.STOPLOSS else "the API's square-off marker"
        return f"{kind.value} without {what} for run {event.run_id}"
    at = config.buy_time if kind is EventType.BUY else config.sell_time
    due = MarketCalendar.at(event.trading_day, at)
    if event.trigger_time is None or abs((event.trigger_time - due).total_seconds()) > 1 \
            or due <= datetime.fromisoformat(config.run_id):
        return (f"{kind.value} for {event.trading_day} at {event.trigger_time} is not a time of the run's "
                f"schedule ({at} IST on a day after its start {config.run_id})")
    early_s = (due - snap.now).total_seconds()
    if early_s > early_tolerance_s:
        return f"{kind.value} arrived {early_s:.0f} s before its scheduled time {due.isoformat()}"
    return None


def _decide_entry(event: Event, config: StrategyConfig, snap: Snapshot) -> Decision:
    if snap.position is not Position.none:
        return Decision(Action.SKIP, f"BUY needs position none, found {snap.position.value}")
    if snap.halt is not None:
        # Nothing is held, so the run ends now rather than at a SELL with nothing to sell.
        return Decision(Action.SKIP, f"operator halt: no new entries ({snap.halt})", unload=True,
                        strategy_status=StrategyStatus.failed,
                        failure_reason=f"entry skipped: operator halt ({snap.halt})")
    sell_at = MarketCalendar.at(event.trading_day, config.sell_time)
    if snap.now >= sell_at:
        # Too late to enter, unless it was placed before a crash: then the placement
        # finds it by tag and records it.
        if snap.entry is None:
            return LOOK_UP_ENTRY
        if snap.entry.order is None:
            reason = (f"entry could not be placed before sell_time ({sell_at.isoformat()}); "
                      "the run ends without trading")
            return Decision(Action.SKIP, reason, unload=True, strategy_status=StrategyStatus.failed,
                            failure_reason=reason)
    # The book is searched for the entry tag first unless this is the run's first entry
    # event on its first delivery and it deleted the unsent-entry key the start wrote
    # (see libs.schema.keys.entry_unsent_key); always once the book was read already
    # (a late entry found there is confirmed, never placed beside).
    lookup = event.attempt > 1 or snap.deliveries > 1 or not snap.entry_unsent or snap.entry is not None
    return PLACE_ENTRY_LOOKUP if lookup else PLACE_ENTRY


def _decide_exit(event: Event, kind: EventType, snap: Snapshot) -> Decision:
    position = snap.position
    if position in EXIT_POSITIONS:
        # Already exited; if the run is still loaded a crash came between the
        # exit's commit and its unload, so finish that unload now.
        return Decision(Action.SKIP, f"{kind.value} needs position bought, found {position.value}", unload=True)
    if position is Position.bought:
        # An exit is looked up first whenever one may already have been sent for
        # this run (by this event earlier, or by another exit event): SELL,
        # STOPLOSS and square-off share the exit tag and must not both fill.
        lookup = event.attempt > 1 or snap.deliveries > 1 or snap.exit_attempted
        return PLACE_EXIT_LOOKUP if lookup else PLACE_EXIT
    # Position none: runtime may have been lost with Redis, so the broker's entry decides.
    entry = snap.entry
    if entry is None:
        return LOOK_UP_ENTRY
    order = entry.order
    status = order.get("status") if order is not None else None
    if order is not None and status not in TERMINAL and kind is EventType.SELL and entry.cancelled is None:
        # The entry is still live (an ambiguous BUY not filled yet). Unloading now would
        # leave a later fill with no SELL and no stop-loss: cancel it first, and exit
        # instead if it filled meanwhile.
        return CANCEL_ENTRY
    if order is not None and (status == COMPLETE or (status in TERMINAL and filled_quantity(order) > 0)):
        # A dead entry that partly filled holds shares too: the exit sells what the book shows.
        return PLACE_EXIT_LOOKUP
    if order is None and kind is EventType.SELL:
        # The run's BUY may still wait in the stream (a crashed executor held it): its
        # outcome decides, not this exit; the BUY itself ends the run if it is too late.
        if snap.entry_pending is None:
            return CHECK_ENTRY_PENDING
        if snap.entry_pending:
            return WAIT_FOR_ENTRY
    reason = f"{kind.value} needs position bought, found none (no filled entry at the broker)"
    extra = {"entry_cancelled": entry.cancelled} if entry.cancelled else {}
    if kind is not EventType.SELL:
        return Decision(Action.SKIP, reason, extra=extra)
    # Sell time came with nothing bought: the run is over. Unloading also stops a
    # late BUY retry from opening a position with no SELL left. A square-off exits
    # a strategy the user already stopped: it stays stopped.
    if event.metadata.get("square_off"):
        return Decision(Action.SKIP, reason, extra=extra, unload=True)
    return Decision(Action.SKIP, reason, extra=extra, unload=True, strategy_status=StrategyStatus.failed,
                    failure_reason="no position at sell time (entry never filled)")


def settle(kind: EventType, result: OrderResult) -> Settlement:
    """Return what the order's end means: an entry holds whatever filled; an exit sells what is held."""
    if kind is EventType.BUY:
        return Settlement.FILLED if result.filled or result.partially_filled else Settlement.ENTRY_FAILED
    if result.remaining == 0:
        return Settlement.FILLED
    return Settlement.EXIT_PARTLY_FILLED if result.filled_quantity > 0 else Settlement.RETRY


def broker_failure(kind: EventType, error_kind: BrokerErrorKind) -> Failure:
    """Return what a broker error (after the placement's own tag lookup) means for the event."""
    if error_kind is BrokerErrorKind.AUTH:
        return Failure.AUTH
    if error_kind is BrokerErrorKind.FINAL and kind is EventType.BUY:
        return Failure.ENTRY_REFUSED
    # A rejected exit retries, then aborts loudly: the position stays open.
    return Failure.RETRY


def exit_status(event: Event) -> StrategyStatus | None:
    """Return the status a run ends with once its exit filled (a square-off leaves it stopped)."""
    return None if event.metadata.get("square_off") else StrategyStatus.exited


def give_up_reason(kind: EventType, attempt: int, max_attempts: int, response: Mapping[str, Any]) -> str | None:
    """Return why the run aborts if attempt `attempt` was the last one allowed, else None (retry)."""
    if attempt + 1 <= max_attempts:
        return None
    detail = response.get("message") or response.get("error") or response.get("status")
    return f"{kind.value} failed after {attempt} attempts: {detail}"


def runtime_of(fields: Mapping[bytes, bytes]) -> tuple[Position, int | None]:
    """Return `position` and `filled_quantity` from an HGETALL of `runtime:{id}` (raise ValueError if invalid)."""
    raw = fields.get(b"position")
    position = Position(raw.decode()) if raw is not None else Position.none
    raw = fields.get(b"filled_quantity")
    held = int(raw) if raw is not None else None
    if held is not None and held < 0:
        raise ValueError(f"runtime filled_quantity is negative: {held}")
    return position, held
