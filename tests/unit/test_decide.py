"""The executor's decision table (services.executor.decide), row by row: every event against every position.

Each row states its expected decision outright. The scene: a run started on
Tuesday 2026-11-24, buying at 10:00 and selling at 15:00 IST on Wednesday
2026-11-25; every event arrives on time unless the row says otherwise.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from itertools import product
from typing import Any
from uuid import UUID

import pytest

from libs.broker.kite import BrokerErrorKind
from libs.schema.models import (
    AbortEvent,
    BuyEvent,
    Event,
    EventType,
    Position,
    RetryEvent,
    SellEvent,
    StoplossEvent,
    StrategyConfig,
    StrategyStatus,
)
from services.executor.decide import (
    Action,
    Decision,
    EntryOrder,
    Failure,
    Settlement,
    Snapshot,
    broker_failure,
    decide,
    give_up_reason,
    runtime_of,
    settle,
)
from services.executor.placement import OrderResult

SID = UUID("8d3c4a51-6a4e-4e4e-9f6b-0c2f5e1d7a10")
USER = UUID("0b9f1e2d-3c4b-4a59-8e7f-6d5c4b3a2910")
DAY = date(2026, 11, 25)
RUN = "2026-11-24T10:30:00.000000+00:00"
OLD_RUN = "2026-11-23T10:30:00.000000+00:00"
BUY_AT = datetime(2026, 11, 25, 4, 30, tzinfo=UTC)  # 10:00 IST
SELL_AT = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)  # 15:00 IST
MIDDAY = datetime(2026, 11, 25, 6, 30, tzinfo=UTC)  # 12:00 IST: stop-loss, square-off, ABORT
TOLERANCE_S = 5.0
CONFIG = StrategyConfig(strategy_id=SID, user_id=USER, symbol="INFY", buy_time="10:00:00", sell_time="15:00:00",
                        stop_loss=1400, quantity=10, status="running", run_id=RUN)
ABORT_REASON = "SELL failed after 5 attempts: network down"
NO_ENTRY = "needs position bought, found none (no filled entry at the broker)"


def buy(run: str = RUN, at: datetime | None = BUY_AT) -> BuyEvent:
    return BuyEvent(strategy_id=SID, run_id=run, trading_day=DAY, trigger_time=at)


def sell(run: str = RUN, at: datetime | None = SELL_AT) -> SellEvent:
    return SellEvent(strategy_id=SID, run_id=run, trading_day=DAY, trigger_time=at)


def square_off(run: str = RUN) -> SellEvent:
    return SellEvent(strategy_id=SID, run_id=run, trading_day=DAY, trigger_time=MIDDAY,
                     metadata={"square_off": True})


def stoploss(run: str = RUN) -> StoplossEvent:
    return StoplossEvent(strategy_id=SID, run_id=run, trading_day=DAY, trigger_time=MIDDAY, trigger_price=1399.5)


def retry(of: EventType, run: str = RUN, attempt: int = 2) -> RetryEvent:
    at = {EventType.BUY: BUY_AT, EventType.SELL: SELL_AT, EventType.STOPLOSS: MIDDAY}[of]
    return RetryEvent(strategy_id=SID, run_id=run, trading_day=DAY, trigger_time=at, retry_of=of, attempt=attempt)


def abort(run: str = RUN, **metadata: Any) -> AbortEvent:
    return AbortEvent(strategy_id=SID, run_id=run, trading_day=DAY, reason=ABORT_REASON, metadata=metadata)


# Each event as its producer writes it, with the moment it reaches the executor.
EVENTS: dict[str, tuple[Event, datetime]] = {
    "BUY": (buy(), BUY_AT),
    "SELL": (sell(), SELL_AT),
    "SQUARE_OFF": (square_off(), MIDDAY),
    "STOPLOSS": (stoploss(), MIDDAY),
    "RETRY_BUY": (retry(EventType.BUY), BUY_AT + timedelta(seconds=30)),
    "RETRY_SELL": (retry(EventType.SELL), SELL_AT + timedelta(seconds=30)),
    "RETRY_STOPLOSS": (retry(EventType.STOPLOSS), MIDDAY + timedelta(seconds=30)),
    "ABORT": (abort(), MIDDAY),
}


def skip(reason: str, **fields: Any) -> Decision:
    return Decision(Action.SKIP, reason, **fields)


def place_entry() -> Decision:
    return Decision(Action.PLACE_ENTRY, lookup=True)


def place_exit(*, lookup: bool) -> Decision:
    return Decision(Action.PLACE_EXIT, lookup=lookup)


def refuse(reason: str) -> Decision:
    return Decision(Action.REFUSE, reason)


def aborted(*, unload: bool = True, open_position: bool = False,
            status: StrategyStatus | None = StrategyStatus.failed) -> Decision:
    return Decision(Action.ABORT_RUN, ABORT_REASON, unload=unload, strategy_status=status,
                    failure_reason=ABORT_REASON, open_position=open_position)


LOOK_UP_ENTRY = Decision(Action.LOOK_UP_ENTRY)
EXITED = {"unload": True}  # an exit found the run exited: finish the unload a crash interrupted

TABLE: list[tuple[str, Position, Decision]] = [
    # --- position none: only an entry is placed; an exit asks the broker first ------------
    ("BUY", Position.none, place_entry()),
    ("SELL", Position.none, LOOK_UP_ENTRY),
    ("SQUARE_OFF", Position.none, LOOK_UP_ENTRY),
    ("STOPLOSS", Position.none, LOOK_UP_ENTRY),
    ("RETRY_BUY", Position.none, place_entry()),
    ("RETRY_SELL", Position.none, LOOK_UP_ENTRY),
    ("RETRY_STOPLOSS", Position.none, LOOK_UP_ENTRY),
    ("ABORT", Position.none, aborted()),
    # --- bought: exits are placed (a retry looks its tag up first); no second entry -------
    ("BUY", Position.bought, skip("BUY needs position none, found bought")),
    ("SELL", Position.bought, place_exit(lookup=False)),
    ("SQUARE_OFF", Position.bought, place_exit(lookup=False)),
    ("STOPLOSS", Position.bought, place_exit(lookup=False)),
    ("RETRY_BUY", Position.bought, skip("BUY needs position none, found bought")),
    ("RETRY_SELL", Position.bought, place_exit(lookup=True)),
    ("RETRY_STOPLOSS", Position.bought, place_exit(lookup=True)),
    ("ABORT", Position.bought, aborted(open_position=True)),
    # --- sold: nothing more is sent; an exit finishes the unload -------------------------
    ("BUY", Position.sold, skip("BUY needs position none, found sold")),
    ("SELL", Position.sold, skip("SELL needs position bought, found sold", **EXITED)),
    ("SQUARE_OFF", Position.sold, skip("SELL needs position bought, found sold", **EXITED)),
    ("STOPLOSS", Position.sold, skip("STOPLOSS needs position bought, found sold", **EXITED)),
    ("RETRY_BUY", Position.sold, skip("BUY needs position none, found sold")),
    ("RETRY_SELL", Position.sold, skip("SELL needs position bought, found sold", **EXITED)),
    ("RETRY_STOPLOSS", Position.sold, skip("STOPLOSS needs position bought, found sold", **EXITED)),
    ("ABORT", Position.sold, aborted()),
    # --- exited by the stop-loss: the same, the late SELL of the day included --------------
    ("BUY", Position.exited_by_sl, skip("BUY needs position none, found exited_by_sl")),
    ("SELL", Position.exited_by_sl, skip("SELL needs position bought, found exited_by_sl", **EXITED)),
    ("SQUARE_OFF", Position.exited_by_sl, skip("SELL needs position bought, found exited_by_sl", **EXITED)),
    ("STOPLOSS", Position.exited_by_sl, skip("STOPLOSS needs position bought, found exited_by_sl", **EXITED)),
    ("RETRY_BUY", Position.exited_by_sl, skip("BUY needs position none, found exited_by_sl")),
    ("RETRY_SELL", Position.exited_by_sl, skip("SELL needs position bought, found exited_by_sl", **EXITED)),
    ("RETRY_STOPLOSS", Position.exited_by_sl,
     skip("STOPLOSS needs position bought, found exited_by_sl", **EXITED)),
    ("ABORT", Position.exited_by_sl, aborted()),
]


def snapshot(now: datetime, position: Position = Position.none, **facts: Any) -> Snapshot:
    """The loaded run as the lock read it, its intent markers set (as their producers set them)."""
    return Snapshot(facts.pop("config", CONFIG), position, now, **{"intent_marked": True, **facts})


def decided(name: str, position: Position = Position.none, **facts: Any) -> Decision:
    event, now = EVENTS[name]
    return decide(event, snapshot(facts.pop("now", now), position, **facts), early_tolerance_s=TOLERANCE_S)


@pytest.mark.parametrize(("name", "position", "expected"), TABLE,
                         ids=[f"{name}-{position.value}" for name, position, _ in TABLE])
def test_event_against_position(name: str, position: Position, expected: Decision) -> None:
    assert decided(name, position) == expected


def test_table_covers_every_event_type_against_every_position() -> None:
    covered = {(EVENTS[name][0].event_type, position) for name, position, _ in TABLE}
    assert covered == set(product(EventType, Position))
    assert {(name, position) for name, position, _ in TABLE} == set(product(EVENTS, Position))


@pytest.mark.parametrize("status", list(StrategyStatus))
def test_the_loaded_runs_lifecycle_status_does_not_change_the_decision(status: StrategyStatus) -> None:
    # The API unloads a stopped run (or squares it off): while loaded, its events are decided alike.
    config = CONFIG.model_copy(update={"status": status})
    assert decided("BUY", Position.none, config=config) == place_entry()
    assert decided("SELL", Position.bought, config=config) == place_exit(lookup=False)
    assert decided("STOPLOSS", Position.bought, config=config) == place_exit(lookup=False)


# --- an exit that finds no position: the broker's entry order decides ---------------------

def entry(status: str, filled: int = 0, cancelled: str | None = None) -> EntryOrder:
    return EntryOrder({"order_id": "E1", "status": status, "quantity": 10, "filled_quantity": filled},
                      cancelled=cancelled)


NO_ENTRY_ORDER = EntryOrder(None)
SELL_ENDS_RUN = {"unload": True, "strategy_status": StrategyStatus.failed,
                 "failure_reason": "no position at sell time (entry never filled)"}

EXIT_WITHOUT_POSITION: list[tuple[str, EntryOrder, bool | None, Decision]] = [
    # Nothing at the broker: a SELL first asks whether the run's BUY still waits in the stream.
    ("SELL", NO_ENTRY_ORDER, None, Decision(Action.CHECK_ENTRY_PENDING)),
    ("SELL", NO_ENTRY_ORDER, True, Decision(Action.WAIT_FOR_ENTRY)),
    ("RETRY_SELL", NO_ENTRY_ORDER, True, Decision(Action.WAIT_FOR_ENTRY)),
    ("SELL", NO_ENTRY_ORDER, False, skip(f"SELL {NO_ENTRY}", **SELL_ENDS_RUN)),
    ("SQUARE_OFF", NO_ENTRY_ORDER, False, skip(f"SELL {NO_ENTRY}", unload=True)),  # the user's stop stays
    ("STOPLOSS", NO_ENTRY_ORDER, None, skip(f"STOPLOSS {NO_ENTRY}")),  # no wait, no unload: the SELL ends it
    ("RETRY_STOPLOSS", NO_ENTRY_ORDER, None, skip(f"STOPLOSS {NO_ENTRY}")),
    # The entry is still live: a SELL cancels it first; a stop-loss leaves it to the SELL.
    ("SELL", entry("OPEN"), None, Decision(Action.CANCEL_ENTRY)),
    ("SQUARE_OFF", entry("OPEN"), None, Decision(Action.CANCEL_ENTRY)),
    ("RETRY_SELL", entry("TRIGGER PENDING"), None, Decision(Action.CANCEL_ENTRY)),
    ("STOPLOSS", entry("OPEN"), None, skip(f"STOPLOSS {NO_ENTRY}")),
    # After the cancel: how the entry ended decides (and it is never cancelled twice).
    ("SELL", entry("CANCELLED", cancelled="E1"), None,
     skip(f"SELL {NO_ENTRY}", extra={"entry_cancelled": "E1"}, **SELL_ENDS_RUN)),
    ("SQUARE_OFF", entry("CANCELLED", cancelled="E1"), None,
     skip(f"SELL {NO_ENTRY}", extra={"entry_cancelled": "E1"}, unload=True)),
    ("SELL", entry("COMPLETE", filled=10, cancelled="E1"), None, place_exit(lookup=True)),
    ("SELL", entry("CANCELLED", filled=3, cancelled="E1"), None, place_exit(lookup=True)),
    ("SELL", entry("OPEN", cancelled="E1"), None,
     skip(f"SELL {NO_ENTRY}", extra={"entry_cancelled": "E1"}, **SELL_ENDS_RUN)),
    # Runtime lost a filled entry (Redis lost state): exit per the broker, looking the tag up.
    ("SELL", entry("COMPLETE", filled=10), None, place_exit(lookup=True)),
    ("STOPLOSS", entry("COMPLETE", filled=10), None, place_exit(lookup=True)),
    ("RETRY_STOPLOSS", entry("REJECTED", filled=4), None, place_exit(lookup=True)),
    ("STOPLOSS", entry("REJECTED"), None, skip(f"STOPLOSS {NO_ENTRY}")),
]


@pytest.mark.parametrize(("name", "found", "pending", "expected"), EXIT_WITHOUT_POSITION)
def test_exit_without_position(name: str, found: EntryOrder, pending: bool | None, expected: Decision) -> None:
    assert decided(name, Position.none, entry=found, entry_pending=pending) == expected


# --- the entry: operator halt, and one that comes only after sell time --------------------

LATE = "entry could not be placed before sell_time (2026-11-25T09:30:00+00:00); the run ends without trading"
HALTED = {"unload": True, "strategy_status": StrategyStatus.failed,
          "failure_reason": "entry skipped: operator halt (maintenance)"}

ENTRY_ROWS: list[tuple[str, Position, dict[str, Any], Decision]] = [
    ("BUY", Position.none, {"halt": "maintenance"}, skip("operator halt: no new entries (maintenance)", **HALTED)),
    ("RETRY_BUY", Position.none, {"halt": "maintenance"},
     skip("operator halt: no new entries (maintenance)", **HALTED)),
    ("BUY", Position.bought, {"halt": "maintenance"}, skip("BUY needs position none, found bought")),
    ("SELL", Position.bought, {"halt": "maintenance"}, place_exit(lookup=False)),  # exits are never held back
    ("BUY", Position.none, {"now": SELL_AT - timedelta(seconds=1)}, place_entry()),
    ("BUY", Position.none, {"now": SELL_AT}, LOOK_UP_ENTRY),
    ("RETRY_BUY", Position.none, {"now": SELL_AT + timedelta(minutes=5)}, LOOK_UP_ENTRY),
    ("BUY", Position.none, {"now": SELL_AT, "entry": NO_ENTRY_ORDER},
     skip(LATE, unload=True, strategy_status=StrategyStatus.failed, failure_reason=LATE)),
    # Placed before a crash: the placement finds it by tag and records it.
    ("BUY", Position.none, {"now": SELL_AT, "entry": entry("COMPLETE", filled=10)}, place_entry()),
    ("BUY", Position.none, {"now": SELL_AT, "entry": entry("OPEN")}, place_entry()),
    ("BUY", Position.none, {"now": SELL_AT, "halt": "maintenance"},
     skip("operator halt: no new entries (maintenance)", **HALTED)),
]


@pytest.mark.parametrize(("name", "position", "facts", "expected"), ENTRY_ROWS)
def test_entry(name: str, position: Position, facts: dict[str, Any], expected: Decision) -> None:
    assert decided(name, position, **facts) == expected


@pytest.mark.parametrize(("name", "facts", "lookup"), [
    ("SELL", {}, False),  # the stop-loss path's fast case: no order book read before sending
    ("STOPLOSS", {}, False),
    ("SELL", {"deliveries": 2}, True),  # redelivered: it may have been sent before a crash
    ("STOPLOSS", {"deliveries": 3}, True),
    ("SELL", {"exit_attempted": True}, True),  # another exit of the run was attempted: same exit tag
    ("SQUARE_OFF", {"exit_attempted": True}, True),
    ("RETRY_SELL", {}, True),
])
def test_an_exit_looks_its_tag_up_first_whenever_one_may_have_been_sent(name: str, facts: dict[str, Any],
                                                                         lookup: bool) -> None:
    assert decided(name, Position.bought, **facts) == place_exit(lookup=lookup)


@pytest.mark.parametrize(("name", "facts", "lookup"), [
    ("BUY", {"entry_unsent": True}, False),  # the open's fast case: nothing can be at the broker yet
    ("BUY", {}, True),  # the key was gone: consumed by an earlier event, or deleted after a Redis loss
    ("BUY", {"entry_unsent": True, "deliveries": 2}, True),  # redelivered: it may have been sent
    ("RETRY_BUY", {"entry_unsent": True}, True),
    # Too late, but the book already showed an entry: it is confirmed, never placed beside.
    ("BUY", {"entry_unsent": True, "now": SELL_AT, "entry": entry("OPEN")}, True),
])
def test_an_entry_looks_its_tag_up_first_whenever_one_may_have_been_sent(name: str, facts: dict[str, Any],
                                                                          lookup: bool) -> None:
    assert decided(name, Position.none, **facts) == Decision(Action.PLACE_ENTRY, lookup=lookup)


# --- events of another run, and events the run's producers did not write -------------------

LOADED = {"extra": {"loaded_run_id": RUN}}


@pytest.mark.parametrize(("event", "expected"), [
    (buy(OLD_RUN), refuse(f"BUY names run {OLD_RUN}, but the loaded run is {RUN}")),
    (sell(OLD_RUN), refuse(f"SELL names run {OLD_RUN}, but the loaded run is {RUN}")),
    (square_off(OLD_RUN), refuse(f"SELL names run {OLD_RUN}, but the loaded run is {RUN}")),
    # A late stop-loss or retry of an ended run: skipped; a stop-loss un-marks that run.
    (stoploss(OLD_RUN), skip("run not loaded", clear_stoploss_marker=True, **LOADED)),
    (retry(EventType.STOPLOSS, OLD_RUN), skip("run not loaded", clear_stoploss_marker=True, **LOADED)),
    (retry(EventType.BUY, OLD_RUN), skip("run not loaded", **LOADED)),
    (retry(EventType.SELL, OLD_RUN), skip("run not loaded", **LOADED)),
    (abort(OLD_RUN), aborted(unload=False)),  # recorded, but the loaded run is not unloaded
])
def test_event_of_a_previous_run(event: Event, expected: Decision) -> None:
    assert decide(event, snapshot(MIDDAY, Position.bought), early_tolerance_s=TOLERANCE_S) == expected


@pytest.mark.parametrize(("event", "expected"), [
    (buy(), skip("run not loaded", extra={"loaded_run_id": None})),
    (sell(), skip("run not loaded", extra={"loaded_run_id": None})),
    (stoploss(), skip("run not loaded", extra={"loaded_run_id": None}, clear_stoploss_marker=True)),
    (retry(EventType.STOPLOSS), skip("run not loaded", extra={"loaded_run_id": None}, clear_stoploss_marker=True)),
    (abort(), aborted(unload=False)),
])
def test_event_with_no_run_loaded(event: Event, expected: Decision) -> None:
    snap = Snapshot(None, Position.none, MIDDAY)
    assert decide(event, snap, early_tolerance_s=TOLERANCE_S) == expected


def test_a_square_off_abort_leaves_the_users_stop_in_place() -> None:
    snap = snapshot(MIDDAY, Position.bought)
    expected = aborted(open_position=True, status=None)
    assert decide(abort(square_off=True), snap, early_tolerance_s=TOLERANCE_S) == expected


SCHEDULE = f"IST on a day after its start {RUN})"
SAME_DAY_RUN = "2026-11-25T05:00:00.000000+00:00"  # started at 10:30 IST, after that day's buy time


@pytest.mark.parametrize(("event", "now", "marked", "expected"), [
    (buy(at=BUY_AT), BUY_AT - timedelta(seconds=60), True,
     refuse("BUY arrived 60 s before its scheduled time 2026-11-25T04:30:00+00:00")),
    (buy(at=BUY_AT), BUY_AT - timedelta(seconds=4), True, place_entry()),  # within the tolerance
    (retry(EventType.BUY), BUY_AT - timedelta(seconds=60), True,
     refuse("BUY arrived 60 s before its scheduled time 2026-11-25T04:30:00+00:00")),
    (buy(at=BUY_AT + timedelta(seconds=2)), BUY_AT, True,
     refuse(f"BUY for 2026-11-25 at 2026-11-25 04:30:02+00:00 is not a time of the run's schedule (10:00:00 "
            f"{SCHEDULE}")),
    (buy(at=None), BUY_AT, True,
     refuse(f"BUY for 2026-11-25 at None is not a time of the run's schedule (10:00:00 {SCHEDULE}")),
    (sell(at=BUY_AT), BUY_AT, True,
     refuse(f"SELL for 2026-11-25 at 2026-11-25 04:30:00+00:00 is not a time of the run's schedule (15:00:00 "
            f"{SCHEDULE}")),
    (stoploss(), MIDDAY, False, refuse(f"STOPLOSS without the listener's stop-loss marker for run {RUN}")),
    (retry(EventType.STOPLOSS), MIDDAY, False,
     refuse(f"STOPLOSS without the listener's stop-loss marker for run {RUN}")),
    (square_off(), MIDDAY, False, refuse(f"SELL without the API's square-off marker for run {RUN}")),
])
def test_an_event_its_runs_producers_did_not_write_is_refused(event: Event, now: datetime, marked: bool,
                                                              expected: Decision) -> None:
    snap = snapshot(now, Position.none, intent_marked=marked)
    assert decide(event, snap, early_tolerance_s=TOLERANCE_S) == expected


def test_an_entry_on_its_runs_start_day_before_the_start_is_refused() -> None:
    config = CONFIG.model_copy(update={"run_id": SAME_DAY_RUN})
    snap = snapshot(BUY_AT, Position.none, config=config)
    assert decide(buy(SAME_DAY_RUN), snap, early_tolerance_s=TOLERANCE_S) == refuse(
        "BUY for 2026-11-25 at 2026-11-25 04:30:00+00:00 is not a time of the run's schedule (10:00:00 IST on a "
        f"day after its start {SAME_DAY_RUN})")


# --- the handler's loop ends: a fact once given is never asked for again --------------------

ENTRY_FACTS = [NO_ENTRY_ORDER, entry("OPEN"), entry("COMPLETE", 10), entry("CANCELLED", 3), entry("REJECTED")]


@pytest.mark.parametrize("name", list(EVENTS))
def test_no_fact_is_asked_for_twice(name: str) -> None:
    for position, found, pending, now in product(Position, ENTRY_FACTS, (True, False), (EVENTS[name][1], SELL_AT)):
        settled = decided(name, position, entry=found, entry_pending=pending, now=now)
        assert settled.action not in (Action.LOOK_UP_ENTRY, Action.CHECK_ENTRY_PENDING), (position, found)
        cancelled = EntryOrder(found.order, cancelled="E1") if found.order else found
        again = decided(name, position, entry=cancelled, entry_pending=pending, now=now)
        assert again.action is not Action.CANCEL_ENTRY, (position, found)


# --- what a placed order's end, a broker error and a failed attempt mean --------------------

def result(status: str, filled: int, remaining: int | None = None) -> OrderResult:
    return OrderResult(order_id="O1", status=status, average_price=1500.0 if filled else None, status_message=None,
                       found_by_tag=False, broker_order={}, filled_quantity=filled, remaining=remaining)


@pytest.mark.parametrize(("kind", "order", "expected"), [
    (EventType.BUY, result("COMPLETE", 10), Settlement.FILLED),
    (EventType.BUY, result("CANCELLED", 4), Settlement.FILLED),  # what filled is held
    (EventType.BUY, result("REJECTED", 0), Settlement.ENTRY_FAILED),
    (EventType.BUY, result("CANCELLED", 0), Settlement.ENTRY_FAILED),
    (EventType.SELL, result("COMPLETE", 10, remaining=0), Settlement.FILLED),
    (EventType.STOPLOSS, result("CANCELLED", 10, remaining=0), Settlement.FILLED),
    (EventType.SELL, result("CANCELLED", 3, remaining=7), Settlement.EXIT_PARTLY_FILLED),
    (EventType.STOPLOSS, result("REJECTED", 0, remaining=10), Settlement.RETRY),
    (EventType.SELL, result("CANCELLED", 0, remaining=10), Settlement.RETRY),
])
def test_settle(kind: EventType, order: OrderResult, expected: Settlement) -> None:
    assert settle(kind, order) is expected


@pytest.mark.parametrize(("kind", "error", "expected"), [
    (EventType.BUY, BrokerErrorKind.AUTH, Failure.AUTH),
    (EventType.SELL, BrokerErrorKind.AUTH, Failure.AUTH),
    (EventType.STOPLOSS, BrokerErrorKind.AUTH, Failure.AUTH),
    (EventType.BUY, BrokerErrorKind.FINAL, Failure.ENTRY_REFUSED),
    (EventType.SELL, BrokerErrorKind.FINAL, Failure.RETRY),  # a rejected exit retries, then aborts loudly
    (EventType.STOPLOSS, BrokerErrorKind.FINAL, Failure.RETRY),
    (EventType.BUY, BrokerErrorKind.RETRYABLE, Failure.RETRY),
    (EventType.SELL, BrokerErrorKind.RETRYABLE, Failure.RETRY),
    (EventType.BUY, BrokerErrorKind.AMBIGUOUS, Failure.RETRY),
    (EventType.STOPLOSS, BrokerErrorKind.AMBIGUOUS, Failure.RETRY),
])
def test_broker_failure(kind: EventType, error: BrokerErrorKind, expected: Failure) -> None:
    assert broker_failure(kind, error) is expected


@pytest.mark.parametrize(("kind", "attempt", "limit", "response", "expected"), [
    (EventType.SELL, 1, 5, {"message": "timeout"}, None),
    (EventType.SELL, 4, 5, {"message": "timeout"}, None),
    (EventType.SELL, 5, 5, {"message": "timeout"}, "SELL failed after 5 attempts: timeout"),
    (EventType.BUY, 7, 5, {"error": "rate limit"}, "BUY failed after 7 attempts: rate limit"),
    (EventType.STOPLOSS, 1, 1, {"status": "REJECTED"}, "STOPLOSS failed after 1 attempts: REJECTED"),
    (EventType.SELL, 3, 3, {}, "SELL failed after 3 attempts: None"),
])
def test_retry_past_the_limit_gives_up(kind: EventType, attempt: int, limit: int, response: dict[str, Any],
                                       expected: str | None) -> None:
    assert give_up_reason(kind, attempt, limit, response) == expected


def test_runtime_snapshot_reads_position_and_shares_held() -> None:
    assert runtime_of({}) == (Position.none, None)
    assert runtime_of({b"position": b"bought", b"filled_quantity": b"7", b"lock_state": b"locked"}) == (
        Position.bought, 7)
    assert runtime_of({b"position": b"exited_by_sl", b"filled_quantity": b"0"}) == (Position.exited_by_sl, 0)
    for bad in ({b"position": b"short"}, {b"filled_quantity": b"-1"}, {b"filled_quantity": b"many"}):
        with pytest.raises(ValueError):
            runtime_of(bad)
