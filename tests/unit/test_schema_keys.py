"""Every Redis name is spelled once, in libs.schema.keys, exactly as docs/design.md says."""

from __future__ import annotations

from datetime import date
from uuid import UUID

import pytest

from libs.schema import keys

SID = UUID("3f0c2a9e-5b1d-4c8e-9a7f-2d6b1e0c4a11")
SID_TEXT = "3f0c2a9e-5b1d-4c8e-9a7f-2d6b1e0c4a11"


@pytest.mark.parametrize("build, expected", [
    (keys.strategy_key, f"strategy:{SID_TEXT}"),
    (keys.runtime_key, f"runtime:{SID_TEXT}"),
    (keys.lock_key, f"lock_state:{SID_TEXT}"),
])
def test_strategy_keys_accept_uuid_or_str(build: object, expected: str) -> None:
    assert callable(build)
    assert build(SID) == build(SID_TEXT) == build(SID_TEXT.upper()) == expected


def test_symbol_keys_use_the_upper_case_symbol() -> None:
    assert keys.symbol_strategies_key("INFY") == keys.symbol_strategies_key(" infy") == "symbol:INFY:strategies"
    assert keys.price_key("M&M") == "price:M&M"


def test_stoploss_marker_is_scoped_to_one_run() -> None:
    run_id = "2025-02-25T03:55:00+00:00"
    assert keys.stoploss_marker_key(SID, run_id) == f"stoploss:fired:{SID_TEXT}:{run_id}"
    assert keys.stoploss_marker_key(SID, run_id) != keys.stoploss_marker_key(SID, "2025-02-25T05:00:00+00:00")


def test_rate_limit_instruments_and_throttle_keys() -> None:
    assert keys.order_rate_key("ab12cd34ef56") == "ratelimit:orders:ab12cd34ef56"
    assert keys.instruments_key("nse", date(2025, 2, 25)) == "instruments:NSE:2025-02-25"
    assert keys.instruments_key("NSE", "2025-02-25") == "instruments:NSE:2025-02-25"
    assert keys.login_throttle_email_key("d1g3st") == "throttle:login:email:d1g3st"
    assert keys.login_throttle_addr_key("10.0.0.7") == "throttle:login:addr:10.0.0.7"


def test_stream_group_and_channel_names_match_the_design() -> None:
    assert (keys.SCHEDULE, keys.SCHEDULE_WAKEUP_CHANNEL) == ("schedule", "schedule:wakeup")
    assert (keys.ORDERS_STREAM, keys.ORDERS_DEAD_STREAM) == ("queue:orders", "queue:orders:dead")
    assert (keys.ORDER_LOGS_STREAM, keys.ORDER_LOGS_DEAD_STREAM) == ("queue:order_logs", "queue:order_logs:dead")
    assert keys.CONTROL_STREAM == "control:strategies"
    assert (keys.EXECUTORS_GROUP, keys.LOG_WRITERS_GROUP) == ("executors", "log-writers")


def test_no_two_names_collide() -> None:
    names = [
        keys.SCHEDULE, keys.SCHEDULE_WAKEUP_CHANNEL, keys.ORDERS_STREAM, keys.ORDERS_DEAD_STREAM,
        keys.ORDER_LOGS_STREAM, keys.ORDER_LOGS_DEAD_STREAM, keys.CONTROL_STREAM,
        keys.strategy_key(SID), keys.runtime_key(SID), keys.lock_key(SID), keys.stoploss_marker_key(SID, "r"),
        keys.symbol_strategies_key("INFY"), keys.price_key("INFY"), keys.order_rate_key("fp"),
        keys.instruments_key("NSE", "2025-02-25"), keys.login_throttle_email_key("x"),
        keys.login_throttle_addr_key("x"),
    ]
    assert len(set(names)) == len(names)


def test_every_public_name_is_exported() -> None:
    public = {name for name in vars(keys) if not name.startswith("_") and (name.isupper() or name.endswith("_key"))} - {"UUID"}
    assert public == set(keys.__all__)


def test_broker_credentials_key_is_per_user_and_case_insensitive() -> None:
    assert keys.broker_credentials_key(SID) == f"broker:{SID_TEXT}"
    assert keys.broker_credentials_key(SID_TEXT.upper()) == f"broker:{SID_TEXT}"
