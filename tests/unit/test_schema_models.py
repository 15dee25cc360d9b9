"""Contract tests of libs.schema models and codec: round trips and validation rules."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel, ValidationError

from libs.schema import codec
from libs.schema.models import (
    AbortEvent,
    BrokerConnectOut,
    BrokerConnectRequest,
    BrokerOrder,
    BrokerSessionRequest,
    BrokerStatusOut,
    BuyEvent,
    ControlMessage,
    ErrorBody,
    ErrorResponse,
    EventType,
    LastAction,
    LockState,
    LoginRequest,
    MalformedEvent,
    OrderLogOut,
    OrderLogRow,
    OrderLogStatus,
    Position,
    RegisterRequest,
    RetryEvent,
    RuntimeState,
    SellEvent,
    StartStrategyRequest,
    StatusResponse,
    StoplossEvent,
    StopStrategyRequest,
    StrategyConfig,
    StrategyCreateRequest,
    StrategyLifecycle,
    StrategyOut,
    StrategyStatus,
    StrategyUpdateRequest,
    TokenOut,
    TransactionType,
    UserOut,
    error_details,
    event_to_json,
    order_log_id,
    parse_event,
)

SID = UUID("3f0c2a9e-5b1d-4c8e-9a7f-2d6b1e0c4a11")
UID = UUID("9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
DAY = date(2025, 2, 25)
NOW = datetime(2025, 2, 25, 9, 30, tzinfo=UTC)
RUN = "2025-02-25T03:55:00+00:00"

STRATEGY_BODY: dict[str, Any] = {
    "symbol": "INFY",
    "buy_time": "09:30:00",
    "sell_time": "15:15:00",
    "stop_loss": 1540.25,
    "quantity": 10,
}


def errors_of(model: type[BaseModel], data: Any) -> list[tuple[tuple[Any, ...], str, str]]:
    """Return (loc, type, msg) of each validation error data raises."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return [(e["loc"], e["type"], e["msg"]) for e in caught.value.errors()]


def strategy_with(**changes: Any) -> dict[str, Any]:
    return {**STRATEGY_BODY, **changes}


# --- round trips through the codec --------------------------------------------

ROUND_TRIP_MODELS: list[BaseModel] = [
    StrategyConfig(strategy_id=SID, user_id=UID, symbol="INFY", buy_time="09:30:00", sell_time="15:15:00",
                   stop_loss=1540.25, quantity=10, status="running", run_id=RUN, instrument_token=408065,
                   api_key_fp="ab12cd34"),
    RuntimeState(position="bought", last_price=1545.2, last_buy_order="250225000000001", lock_state="locked",
                 updated_at=NOW, last_action="BUY"),
    BuyEvent(strategy_id=SID, run_id=RUN, trading_day=DAY, trigger_time=NOW, metadata={"source": "schedule"}),
    SellEvent(strategy_id=SID, run_id=RUN, trading_day=DAY, price=1550.5),
    StoplossEvent(strategy_id=SID, run_id=RUN, trading_day=DAY, trigger_price=1520.25),
    RetryEvent(strategy_id=SID, run_id=RUN, trading_day=DAY, attempt=3, retry_of="SELL"),
    AbortEvent(strategy_id=SID, run_id=RUN, trading_day=DAY, reason="exit rejected 5 times"),
    RegisterRequest(email="a@example.com", password="correct horse", name="A B"),
    LoginRequest(email="a@example.com", password="x"),
    BrokerSessionRequest(request_token="tok123"),
    StrategyCreateRequest.model_validate(STRATEGY_BODY),
    StrategyUpdateRequest(stop_loss=1500),
    StartStrategyRequest(strategy_id=SID),
    StopStrategyRequest(strategy_id=SID, square_off=True),
    StatusResponse(status="running", position="bought", last_action="BUY", last_price=1541.1, timestamp=NOW),
    UserOut(id=UID, email="a@example.com", name="A", created_at=NOW),
    TokenOut(access_token="jwt", expires_in=3600),
    BrokerStatusOut(connected=True, is_valid=True, api_key_hint="…x1y2", updated_at=NOW),
    BrokerConnectOut(is_valid=True, api_key_hint="…x1y2", user_name="A B"),
    StrategyOut(id=SID, symbol="INFY", buy_time=time(9, 30), sell_time=time(15, 15), stop_loss=1540.25,
                quantity=10, status="created", created_at=NOW, updated_at=NOW),
    OrderLogOut(id=uuid4(), strategy_id=SID, event_type="BUY", request_payload={"quantity": 10},
                response_payload={"order_id": "1"}, status="success", created_at=NOW, trading_day=DAY,
                broker_order_id="1", tag="TWEABCDEFGHIJKLMNOPQ"),
    ErrorResponse(error=ErrorBody(code="not_found", message="no such strategy", details={"id": str(SID)})),
    BrokerOrder(symbol="INFY", quantity=10, transaction_type="BUY", tag="TWEABCDEFGHIJKLMNOPQ"),
    StrategyLifecycle(status="exited", started_at=NOW, stopped_at=NOW + timedelta(hours=6)),
    OrderLogRow(id=order_log_id("queue:orders", "1-0"), strategy_id=SID, user_id=UID, event_type="STOPLOSS",
                request_payload={"a": 1}, response_payload={"b": [1, 2]}, status="skipped", trading_day=DAY,
                broker_order_id=None, tag="TWX", stream_msg_id="1-0", created_at=NOW),
    ControlMessage(action="started", strategy_id=SID, symbol="INFY", stop_loss=1540.25, run_id=RUN),
]


@pytest.mark.parametrize("model", ROUND_TRIP_MODELS, ids=lambda m: type(m).__name__)
def test_every_model_survives_a_codec_round_trip(model: BaseModel) -> None:
    restored = type(model).model_validate(codec.loads(codec.dumps(model)))
    assert restored == model
    assert codec.dumps(restored) == codec.dumps(model)


def test_secret_request_round_trip_keeps_the_secret_values() -> None:
    request = BrokerConnectRequest(api_key="key1", api_secret="sec1", access_token="tok1")
    data = {"api_key": "key1", "api_secret": request.api_secret.get_secret_value(),
            "access_token": request.access_token.get_secret_value()}
    restored = BrokerConnectRequest.model_validate(codec.loads(codec.dumps(data)))
    assert restored.api_secret.get_secret_value() == "sec1"
    assert restored.access_token.get_secret_value() == "tok1"


def test_codec_sorts_keys_and_encodes_rich_types() -> None:
    encoded = codec.dumps({"b": Decimal("1.10"), "a": time(9, 30), "c": SID, "d": NOW, "e": DAY})
    assert encoded == (
        b'{"a":"09:30:00","b":"1.10","c":"3f0c2a9e-5b1d-4c8e-9a7f-2d6b1e0c4a11",'
        b'"d":"2025-02-25T09:30:00Z","e":"2025-02-25"}'
    )


def test_codec_refuses_unknown_types() -> None:
    with pytest.raises(TypeError):
        codec.dumps({"x": object()})


# --- Symbol ---------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [(" infy ", "INFY"), ("m&m", "M&M"), ("BAJAJ-AUTO", "BAJAJ-AUTO"),
                                           ("NIFTY_50", "NIFTY_50"), ("A" * 30, "A" * 30)])
def test_symbol_is_stripped_and_upper_cased(raw: str, expected: str) -> None:
    assert StrategyCreateRequest.model_validate(strategy_with(symbol=raw)).symbol == expected


@pytest.mark.parametrize("raw", ["", "   ", "IN FY", "INFY.NS", "A" * 31, "ÄBC"])
def test_bad_symbol_is_rejected_with_a_readable_message(raw: str) -> None:
    assert errors_of(StrategyCreateRequest, strategy_with(symbol=raw)) == [
        (("symbol",), "symbol_format", "symbol must be 1-30 characters of A-Z, 0-9, &, _ or -")
    ]


def test_symbol_must_be_a_string() -> None:
    assert errors_of(StrategyCreateRequest, strategy_with(symbol=123))[0][:2] == (("symbol",), "string_type")


# --- ClockTime --------------------------------------------------------------------

def test_clock_time_parses_to_time_and_serialises_back() -> None:
    request = StrategyCreateRequest.model_validate(strategy_with(buy_time="09:15:00", sell_time="15:20:59"))
    assert (request.buy_time, request.sell_time) == (time(9, 15), time(15, 20, 59))
    assert codec.loads(codec.dumps(request))["sell_time"] == "15:20:59"


@pytest.mark.parametrize("raw", ["9:30", "09:30", "9:30:00", "09:30:00.5", "24:00:00", "09:60:00",
                                 "09:30:00Z", " 09:30:00", 930, None])
def test_clock_time_accepts_only_hh_mm_ss(raw: Any) -> None:
    assert errors_of(StrategyCreateRequest, strategy_with(buy_time=raw)) == [
        (("buy_time",), "clock_time_format", "time must be formatted HH:MM:SS")
    ]


def test_clock_time_rejects_time_objects_with_fractions_or_zones() -> None:
    bad = time(9, 30, 0, 5)
    assert errors_of(StrategyCreateRequest, strategy_with(buy_time=bad))[0][:2] == (
        ("buy_time",), "clock_time_format")


def test_buy_time_must_be_before_sell_time() -> None:
    for buy, sell in [("15:30:00", "09:30:00"), ("10:00:00", "10:00:00")]:
        assert errors_of(StrategyCreateRequest, strategy_with(buy_time=buy, sell_time=sell)) == [
            ((), "value_error", "Value error, buy_time must be before sell_time")
        ]


# --- StopLoss ------------------------------------------------------------------

@pytest.mark.parametrize("raw", [1540.25, 1540, 0.05, 0.1, 99999.99])
def test_stop_loss_accepts_positive_prices_with_two_decimals(raw: float) -> None:
    assert StrategyCreateRequest.model_validate(strategy_with(stop_loss=raw)).stop_loss == raw


@pytest.mark.parametrize("raw, error_type, message", [
    (0, "greater_than", "Input should be greater than 0"),
    (-1.5, "greater_than", "Input should be greater than 0"),
    (1540.255, "stop_loss_precision", "stop_loss must have at most 2 decimal places"),
    (0.1 + 0.2, "stop_loss_precision", "stop_loss must have at most 2 decimal places"),
    (math.inf, "finite_number", "Input should be a finite number"),
    (math.nan, "finite_number", "Input should be a finite number"),
    ("1540.25", "float_type", "Input should be a valid number"),
    (True, "float_type", "Input should be a valid number"),
])
def test_bad_stop_loss_is_rejected(raw: Any, error_type: str, message: str) -> None:
    assert errors_of(StrategyCreateRequest, strategy_with(stop_loss=raw)) == [(("stop_loss",), error_type, message)]


# --- Quantity ------------------------------------------------------------------

@pytest.mark.parametrize("raw", [1, 10, 100_000])
def test_quantity_accepts_whole_shares_in_range(raw: int) -> None:
    assert StrategyCreateRequest.model_validate(strategy_with(quantity=raw)).quantity == raw


@pytest.mark.parametrize("raw, error_type", [
    (0, "greater_than_equal"), (100_001, "less_than_equal"), (1.5, "int_type"), (10.0, "int_type"),
    (True, "int_type"), ("10", "int_type"), (None, "int_type"),
])
def test_bad_quantity_is_rejected(raw: Any, error_type: str) -> None:
    assert [e[:2] for e in errors_of(StrategyCreateRequest, strategy_with(quantity=raw))] == [
        (("quantity",), error_type)]


def test_quantity_is_strict_in_json_too() -> None:
    body = codec.dumps(strategy_with(quantity=1.5))
    with pytest.raises(ValidationError) as caught:
        StrategyCreateRequest.model_validate_json(body)
    assert caught.value.errors()[0]["loc"] == ("quantity",)


# --- requests: extra fields, updates, auth ------------------------------------------

VALID_REQUESTS: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (RegisterRequest, {"email": "a@example.com", "password": "larch-ferry-41", "name": "A"}),
    (LoginRequest, {"email": "a@example.com", "password": "password1"}),
    (BrokerConnectRequest, {"api_key": "k", "api_secret": "s", "access_token": "t"}),
    (BrokerSessionRequest, {"request_token": "r"}),
    (StrategyCreateRequest, STRATEGY_BODY),
    (StrategyUpdateRequest, {"quantity": 5}),
    (StartStrategyRequest, {"strategy_id": str(SID)}),
    (StopStrategyRequest, {"strategy_id": str(SID)}),
]


@pytest.mark.parametrize("model, body", VALID_REQUESTS, ids=lambda v: getattr(v, "__name__", ""))
def test_request_models_forbid_unknown_fields(model: type[BaseModel], body: dict[str, Any]) -> None:
    model.model_validate(body)
    assert errors_of(model, {**body, "stoploss": 1}) == [(("stoploss",), "extra_forbidden", "Extra inputs are not permitted")]


def test_update_request_takes_any_subset_and_checks_times_only_when_both_given() -> None:
    assert StrategyUpdateRequest().model_dump(exclude_unset=True) == {}
    assert StrategyUpdateRequest(sell_time="09:00:00").sell_time == time(9)
    assert errors_of(StrategyUpdateRequest, {"buy_time": "15:00:00", "sell_time": "09:00:00"}) == [
        ((), "value_error", "Value error, buy_time must be before sell_time")]
    assert errors_of(StrategyUpdateRequest, {"quantity": 0})[0][:2] == (("quantity",), "greater_than_equal")


def test_stop_request_defaults_to_no_square_off_and_wants_a_uuid() -> None:
    assert StopStrategyRequest(strategy_id=SID).square_off is False
    assert errors_of(StopStrategyRequest, {"strategy_id": "nope"})[0][:2] == (("strategy_id",), "uuid_parsing")
    assert errors_of(StopStrategyRequest, {"strategy_id": str(SID), "square_off": "yes"})[0][:2] == (
        ("square_off",), "bool_type")


def test_register_lower_cases_email_and_strips_name() -> None:
    request = RegisterRequest(email="John.Doe@Example.COM", password="larch-ferry-41", name="  John Doe ")
    assert (request.email, request.name) == ("john.doe@example.com", "John Doe")


@pytest.mark.parametrize("field, raw, error_type", [
    ("email", "not-an-email", "value_error"),
    ("password", "short", "string_too_short"),
    ("password", "x" * 129, "string_too_long"),
    ("name", "   ", "string_too_short"),
    ("name", "n" * 101, "string_too_long"),
])
def test_register_rejects_bad_fields(field: str, raw: str, error_type: str) -> None:
    body = {"email": "a@example.com", "password": "larch-ferry-41", "name": "A", field: raw}
    assert [e[:2] for e in errors_of(RegisterRequest, body)] == [((field,), error_type)]


def test_login_lower_cases_email() -> None:
    assert LoginRequest(email="A@B.IO", password="p").email == "a@b.io"


@pytest.mark.parametrize("raw", ["", "has space", "tab\tin", "x" * 201])
@pytest.mark.parametrize("field", ["api_key", "api_secret", "access_token"])
def test_broker_credentials_must_be_short_tokens_without_whitespace(field: str, raw: str) -> None:
    body = {"api_key": "k", "api_secret": "s", "access_token": "t", field: raw}
    assert errors_of(BrokerConnectRequest, body) == [
        ((field,), "broker_token_format", "must be 1-200 characters with no whitespace")]


def test_secrets_never_show_in_repr_str_or_error_text() -> None:
    request = BrokerConnectRequest(api_key="visiblekey", api_secret="s3cr3t", access_token="t0k3n")
    for text in (repr(request), str(request), request.model_dump_json()):
        assert "s3cr3t" not in text and "t0k3n" not in text
    assert request.api_secret.get_secret_value() == "s3cr3t"
    assert "hunter22pw" not in repr(RegisterRequest(email="a@b.io", password="hunter22pw", name="A"))
    assert "hunter22pw" not in repr(LoginRequest(email="a@b.io", password="hunter22pw"))
    with pytest.raises(ValidationError) as caught:
        BrokerConnectRequest(api_key="k", api_secret="s3cr 3t", access_token="t")
    assert "s3cr 3t" not in str(caught.value)
    assert "s3cr 3t" not in repr(error_details(caught.value))


def test_error_details_give_loc_msg_and_type_only() -> None:
    with pytest.raises(ValidationError) as caught:
        StrategyCreateRequest.model_validate(strategy_with(quantity=0))
    assert error_details(caught.value) == [
        {"loc": ["quantity"], "msg": "must be at least 1", "type": "greater_than_equal"}]


def test_error_response_has_the_one_api_error_shape() -> None:
    body = ErrorResponse(error=ErrorBody(code="validation_error", message="bad input", details=[]))
    assert codec.loads(codec.dumps(body)) == {
        "error": {"code": "validation_error", "message": "bad input", "details": []}}


def test_token_out_is_a_bearer_token() -> None:
    assert TokenOut(access_token="x", expires_in=60).token_type == "bearer"


def test_strategy_out_reads_orm_like_objects() -> None:
    class Row:
        id, symbol, buy_time, sell_time, stop_loss, quantity = SID, "INFY", time(9, 30), time(15), 1.5, 2
        status, created_at, updated_at = StrategyStatus.running, NOW, NOW
        started_at = stopped_at = failure_reason = None

    out = StrategyOut.model_validate(Row(), from_attributes=True)
    assert codec.loads(codec.dumps(out))["buy_time"] == "09:30:00"


# --- StrategyConfig, RuntimeState, control -----------------------------------------

def test_strategy_config_matches_schema_2_1_and_ignores_unknown_fields() -> None:
    config = StrategyConfig.model_validate({
        "strategy_id": str(SID), "user_id": str(UID), "symbol": "INFY", "buy_time": "09:30:00",
        "sell_time": "15:30:00", "stop_loss": 1540.25, "quantity": 10, "status": "running",
        "run_id": RUN, "added_later": True,
    })
    assert (config.exchange, config.product, config.instrument_token, config.api_key_fp) == ("NSE", "MIS", None, None)
    assert "added_later" not in codec.loads(codec.dumps(config))


def test_strategy_config_rejects_reversed_times() -> None:
    data = {"strategy_id": str(SID), "user_id": str(UID), "symbol": "INFY", "buy_time": "15:30:00",
            "sell_time": "09:30:00", "stop_loss": 1, "quantity": 1, "status": "running", "run_id": RUN}
    assert errors_of(StrategyConfig, data)[0][0] == ()


def test_runtime_state_hash_round_trip_omits_none() -> None:
    state = RuntimeState(position=Position.bought, last_price=1545.2, last_buy_order="o1",
                         lock_state=LockState.free, updated_at=NOW, last_action=LastAction.BUY)
    encoded = state.to_redis_hash()
    assert encoded == {"position": "bought", "last_price": "1545.2", "last_buy_order": "o1",
                       "lock_state": "free", "updated_at": "2025-02-25T09:30:00Z", "last_action": "BUY"}
    as_bytes = {k.encode(): v.encode() for k, v in encoded.items()}
    assert RuntimeState.from_redis_hash(as_bytes) == state
    assert RuntimeState.from_redis_hash(encoded) == state


def test_runtime_state_reads_an_empty_hash_as_a_fresh_run() -> None:
    state = RuntimeState.from_redis_hash({})
    assert (state.position, state.lock_state, state.last_price) == (Position.none, LockState.free, None)


def test_runtime_state_hash_fields_encode_single_field_updates() -> None:
    assert RuntimeState.hash_fields(position=Position.sold, last_action="SELL", last_price=None) == {
        "position": "sold", "last_action": "SELL"}
    with pytest.raises(ValueError, match="unknown runtime fields"):
        RuntimeState.hash_fields(posiiton="sold")
    with pytest.raises(ValidationError):
        RuntimeState.hash_fields(position="flying")


def test_runtime_state_normalises_updated_at_to_utc_and_needs_a_zone() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    assert RuntimeState(updated_at=datetime(2025, 2, 25, 15, 0, tzinfo=ist)).updated_at == NOW
    assert errors_of(RuntimeState, {"updated_at": "2025-02-25T09:30:00"})[0][:2] == (
        ("updated_at",), "timezone_aware")


def test_control_message_validates_action() -> None:
    assert errors_of(ControlMessage, {"action": "paused", "strategy_id": str(SID), "symbol": "INFY"})[0][:2] == (
        ("action",), "literal_error")
    message = ControlMessage(action="position", strategy_id=SID, symbol="infy", position="bought")
    assert (message.symbol, message.position) == ("INFY", Position.bought)


# --- events ------------------------------------------------------------------------

def event_body(**changes: Any) -> dict[str, Any]:
    return {"event_type": "BUY", "strategy_id": str(SID), "run_id": RUN, "trading_day": "2025-02-25", **changes}


EVENT_CLASSES = (BuyEvent, SellEvent, StoplossEvent, RetryEvent, AbortEvent)


@pytest.mark.parametrize("event", [m for m in ROUND_TRIP_MODELS if isinstance(m, EVENT_CLASSES)],
                         ids=lambda m: type(m).__name__)
def test_every_event_round_trips_through_parse_event(event: BaseModel) -> None:
    for raw in (event_to_json(event), event_to_json(event).decode(), codec.loads(event_to_json(event))):
        parsed = parse_event(raw)
        assert type(parsed) is type(event) and parsed == event


def test_safety_abort_is_read_as_abort_and_written_as_abort() -> None:
    event = parse_event(event_body(event_type="SAFETY_ABORT", reason="kill switch"))
    assert isinstance(event, AbortEvent) and event.event_type is EventType.ABORT
    assert codec.loads(event_to_json(event))["event_type"] == "ABORT"


def test_event_defaults_follow_the_schema() -> None:
    event = parse_event(event_body())
    assert isinstance(event, BuyEvent)
    assert (event.attempt, event.price, event.trigger_time, event.metadata) == (1, None, None, {})


def test_event_json_is_canonical_whatever_the_input_order_or_offset() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    first = BuyEvent(strategy_id=SID, run_id=RUN, trading_day=DAY, trigger_time=NOW, metadata={"b": 1, "a": 2})
    second = parse_event({"metadata": {"a": 2, "b": 1}, "trigger_time": NOW.astimezone(ist).isoformat(),
                          "trading_day": "2025-02-25", "run_id": RUN, "strategy_id": str(SID).upper(),
                          "event_type": "BUY"})
    assert event_to_json(first) == event_to_json(second)
    assert event_to_json(first) == (
        b'{"attempt":1,"event_type":"BUY","metadata":{"a":2,"b":1},"price":null,"run_id":"'
        + RUN.encode() + b'","strategy_id":"3f0c2a9e-5b1d-4c8e-9a7f-2d6b1e0c4a11",'
        b'"trading_day":"2025-02-25","trigger_time":"2025-02-25T09:30:00Z"}'
    )


def test_events_ignore_unknown_fields_from_newer_producers() -> None:
    assert parse_event(event_body(timestamp="2025-02-25T09:30:00Z")) == parse_event(event_body())


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "event is not valid JSON"),
    (b"[]", "event must be a JSON object, not list"),
    (event_body(event_type="HOLD"), "<root>: event_type must be one of BUY, SELL, STOPLOSS, RETRY, ABORT"),
    ({"strategy_id": str(SID)}, "<root>: event_type must be one of BUY, SELL, STOPLOSS, RETRY, ABORT"),
    (event_body(strategy_id="nope"), "BUY.strategy_id: Input should be a valid UUID"),
    (event_body(run_id=""), "BUY.run_id: String should have at least 1 character"),
    (event_body(attempt=0), "BUY.attempt: Input should be greater than or equal to 1"),
    (event_body(attempt=True), "BUY.attempt: Input should be a valid integer"),
    (event_body(trigger_time="2025-02-25T09:30:00"), "BUY.trigger_time: Input should have timezone info"),
    (event_body(event_type="STOPLOSS"), "STOPLOSS.trigger_price: Field required"),
    (event_body(event_type="RETRY", retry_of="ABORT"), "RETRY.retry_of: retry_of must be BUY, SELL or STOPLOSS"),
    (event_body(event_type="ABORT"), "ABORT.reason: Field required"),
])
def test_malformed_events_raise_with_a_readable_reason(raw: Any, reason: str) -> None:
    with pytest.raises(MalformedEvent) as caught:
        parse_event(raw)
    assert caught.value.reason.startswith(reason)


def test_missing_trading_day_is_reported_by_name() -> None:
    body = event_body()
    del body["trading_day"]
    with pytest.raises(MalformedEvent, match="BUY.trading_day: Field required"):
        parse_event(body)


def test_retry_event_carries_the_retried_kind() -> None:
    event = parse_event(event_body(event_type="RETRY", retry_of="STOPLOSS", attempt=2))
    assert isinstance(event, RetryEvent) and event.retry_of is EventType.STOPLOSS and event.attempt == 2


# --- broker orders and order logs --------------------------------------------------

def test_broker_order_is_a_tagged_market_order() -> None:
    order = BrokerOrder(symbol="infy", quantity=10, transaction_type=TransactionType.SELL, tag="TWXABCDEFGHIJKLMNOPQ")
    assert codec.loads(codec.dumps(order)) == {
        "symbol": "INFY", "quantity": 10, "transaction_type": "SELL", "order_type": "MARKET",
        "trigger_price": None, "exchange": "NSE", "product": "MIS", "tag": "TWXABCDEFGHIJKLMNOPQ"}
    assert order.kite_params() == {
        "exchange": "NSE", "tradingsymbol": "INFY", "transaction_type": "SELL", "quantity": 10,
        "product": "MIS", "order_type": "MARKET", "tag": "TWXABCDEFGHIJKLMNOPQ"}


@pytest.mark.parametrize("change, loc", [
    ({"tag": "T" * 21}, ("tag",)), ({"tag": ""}, ("tag",)), ({"tag": "TW-1"}, ("tag",)),
    ({"order_type": "LIMIT"}, ("order_type",)), ({"trigger_price": 1.0}, ("trigger_price",)),
    ({"transaction_type": "SHORT"}, ("transaction_type",)),
])
def test_broker_order_rejects_what_kite_would(change: dict[str, Any], loc: tuple[str, ...]) -> None:
    body = {"symbol": "INFY", "quantity": 1, "transaction_type": "BUY", "tag": "TWE1", **change}
    assert errors_of(BrokerOrder, body)[0][0] == loc


def test_order_log_id_is_deterministic_per_stream_entry() -> None:
    first = order_log_id("queue:orders", "1700000000000-0")
    assert first == order_log_id("queue:orders", b"1700000000000-0")
    assert first.version == 5
    assert len({first, order_log_id("queue:orders", "1700000000000-1"),
                order_log_id("queue:order_logs", "1700000000000-0"),
                order_log_id("queue:orders", "1700000000000-0", "filled")}) == 4


def test_order_log_row_enums_use_schema_values() -> None:
    row = ROUND_TRIP_MODELS[-2]
    assert isinstance(row, OrderLogRow)
    dumped = codec.loads(codec.dumps(row))
    assert (dumped["event_type"], dumped["status"]) == ("STOPLOSS", "skipped")
    assert {s.value for s in OrderLogStatus} == {"success", "failed", "skipped"}
    assert {s.value for s in StrategyStatus} == {"created", "running", "stopped", "exited", "failed"}
