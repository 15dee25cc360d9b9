"""Every Redis name is spelled once, in libs.schema.keys, exactly as docs/design.md says."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date
from uuid import UUID

import pytest
from redis.crc import key_slot

from libs.schema import keys

SID = UUID("3f0c2a9e-5b1d-4c8e-9a7f-2d6b1e0c4a11")
SID_TEXT = "3f0c2a9e-5b1d-4c8e-9a7f-2d6b1e0c4a11"
P0 = "{p0.425}"  # partition 0's tag: the same for every partition count


@pytest.fixture
def partitions() -> Iterator[int]:
    keys.configure_partitions(6)
    try:
        yield 6
    finally:
        keys.configure_partitions(1)


@pytest.mark.parametrize("build, expected", [
    (keys.strategy_key, f"strategy:{SID_TEXT}:{P0}"),
    (keys.runtime_key, f"runtime:{SID_TEXT}:{P0}"),
    (keys.lock_key, f"lock_state:{SID_TEXT}:{P0}"),
])
def test_strategy_keys_accept_uuid_or_str(build: object, expected: str) -> None:
    assert callable(build)
    assert build(SID) == build(SID_TEXT) == build(SID_TEXT.upper()) == expected


def test_symbol_keys_use_the_upper_case_symbol() -> None:
    assert keys.symbol_strategies_key("INFY") == keys.symbol_strategies_key(" infy") == f"symbol:INFY:strategies:{P0}"
    assert keys.price_key("M&M") == "price:M&M"


def test_stoploss_marker_is_scoped_to_one_run() -> None:
    run_id = "2025-02-25T03:55:00+00:00"
    assert keys.stoploss_marker_key(SID, run_id) == f"stoploss:fired:{SID_TEXT}:{run_id}:{P0}"
    assert keys.stoploss_marker_key(SID, run_id) != keys.stoploss_marker_key(SID, "2025-02-25T05:00:00+00:00")


def test_rate_limit_instruments_and_throttle_keys() -> None:
    assert keys.order_rate_key("ab12cd34ef56") == f"ratelimit:orders:ab12cd34ef56:{P0}"
    assert keys.instruments_key("nse", date(2025, 2, 25)) == "instruments:NSE:2025-02-25"
    assert keys.instruments_key("NSE", "2025-02-25") == "instruments:NSE:2025-02-25"
    assert keys.login_throttle_email_key("d1g3st") == "throttle:login:email:d1g3st:{throttle}"
    assert keys.login_throttle_addr_key("10.0.0.7") == "throttle:login:addr:10.0.0.7:{throttle}"
    # One MULTI counts an attempt against both: one slot.
    assert keys.hash_slot(keys.login_throttle_email_key("a")) == keys.hash_slot(keys.login_throttle_addr_key("b"))


def test_stream_group_and_channel_names_match_the_design() -> None:
    assert (keys.SCHEDULE, keys.SCHEDULE_WAKEUP_CHANNEL) == (f"schedule:{P0}", "schedule:wakeup")
    assert (keys.ORDERS_STREAM, keys.ORDERS_DEAD_STREAM) == (f"queue:orders:{P0}", f"queue:orders:dead:{P0}")
    assert (keys.ORDER_LOGS_STREAM, keys.ORDER_LOGS_DEAD_STREAM) == (f"queue:order_logs:{P0}",
                                                                     f"queue:order_logs:dead:{P0}")
    assert keys.CONTROL_STREAM == f"control:strategies:{P0}"
    assert keys.STATE_MARKER == f"tickwise:state:{P0}"
    assert (keys.EXECUTORS_GROUP, keys.LOG_WRITERS_GROUP) == ("executors", "log-writers")


def test_no_two_names_collide() -> None:
    names = [
        keys.SCHEDULE, keys.SCHEDULE_WAKEUP_CHANNEL, keys.ORDERS_STREAM, keys.ORDERS_DEAD_STREAM,
        keys.ORDER_LOGS_STREAM, keys.ORDER_LOGS_DEAD_STREAM, keys.CONTROL_STREAM, keys.STATE_MARKER,
        keys.strategy_key(SID), keys.runtime_key(SID), keys.lock_key(SID), keys.stoploss_marker_key(SID, "r"),
        keys.exit_attempt_key(SID, "r"), keys.broker_credentials_key(SID),
        keys.symbol_strategies_key("INFY"), keys.price_key("INFY"), keys.order_rate_key("fp"),
        keys.instruments_key("NSE", "2025-02-25"), keys.login_throttle_email_key("x"),
        keys.login_throttle_addr_key("x"), keys.NOTIFY_STREAM, keys.NOTIFY_SCHEDULE, keys.NOTIFY_PENDING,
        keys.NOTIFY_DEAD_STREAM,
    ]
    assert len(set(names)) == len(names)


def test_every_public_name_is_exported() -> None:
    public = {name for name in vars(keys) if not name.startswith("_") and (name.isupper() or name.endswith("_key"))} - {"UUID"}
    assert public <= set(keys.__all__)
    assert all(hasattr(keys, name) for name in keys.__all__)


def test_broker_credentials_key_is_per_user_and_case_insensitive() -> None:
    assert keys.broker_credentials_key(SID) == f"broker:{SID_TEXT}:{P0}"
    assert keys.broker_credentials_key(SID_TEXT.upper()) == f"broker:{SID_TEXT}:{P0}"


def test_our_slot_function_agrees_with_redis_py() -> None:
    for name in ("plain", "a{tag}b", "{}x", "x{}", "{a}{b}", "}{x}", keys.strategy_key(SID)):
        assert keys.hash_slot(name) == key_slot(name.encode()), name


def test_partitions_spread_evenly_over_the_slot_space(partitions: int) -> None:
    slots = [keys.hash_slot(keys.orders_stream(p)) for p in range(partitions)]
    for p, slot in enumerate(slots):
        # Partition p hashes into the p-th sixth of the slots: with 3 (or 6) masters
        # holding even slot ranges, each master serves 2 (or 1) partitions.
        assert p * keys.SLOTS // partitions <= slot < (p + 1) * keys.SLOTS // partitions
    assert keys.orders_stream(0) == keys.ORDERS_STREAM  # partition 0 does not move with N
    with pytest.raises(ValueError):
        keys.orders_stream(partitions)
    with pytest.raises(ValueError):
        keys.configure_partitions(0)


def test_a_strategys_keys_and_its_partitions_shared_keys_share_one_slot(partitions: int) -> None:
    seen: set[int] = set()
    for _ in range(200):
        sid = uuid.uuid4()
        p = keys.partition_of(sid)
        seen.add(p)
        assert keys.partition_of(str(sid).upper()) == p
        group = [keys.strategy_key(sid), keys.runtime_key(sid), keys.lock_key(sid),
                 keys.stoploss_marker_key(sid, "r"), keys.exit_attempt_key(sid, "r"),
                 keys.symbol_strategies_key("INFY", p), keys.schedule_key(p), keys.orders_stream(p),
                 keys.orders_dead_stream(p), keys.order_logs_stream(p), keys.control_stream(p),
                 keys.notify_stream(p), keys.notify_schedule(p), keys.notify_pending(p), keys.notify_dead_stream(p)]
        assert len({key_slot(k.encode()) for k in group}) == 1, group
    assert seen == set(range(partitions))  # every partition gets strategies
