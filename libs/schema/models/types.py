"""Define the enums and reusable annotated field types of the contract."""

from __future__ import annotations

import re
from datetime import UTC, datetime, time
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    Strict,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "BrokerToken",
    "ClockTime",
    "EventType",
    "LastAction",
    "LockState",
    "OrderLogStatus",
    "Position",
    "Price",
    "Quantity",
    "SecretBrokerToken",
    "StopLoss",
    "StrategyStatus",
    "Symbol",
    "TransactionType",
    "UtcDatetime",
    "require_buy_before_sell",
]


# --- enums --------------------------------------------------------------------

class StrategyStatus(StrEnum):
    """Lifecycle of a strategy (data model §6)."""

    created = "created"
    running = "running"
    stopped = "stopped"
    exited = "exited"
    failed = "failed"


class Position(StrEnum):
    """Position of a strategy run, the executor's state machine (data model §2.2)."""

    none = "none"
    bought = "bought"
    sold = "sold"
    exited_by_sl = "exited_by_sl"


class LockState(StrEnum):
    """Whether an executor is working on the strategy (data model §2.2)."""

    free = "free"
    locked = "locked"


class EventType(StrEnum):
    """Kind of event on `queue:orders` and in `order_logs` (data model §3)."""

    BUY = "BUY"
    SELL = "SELL"
    STOPLOSS = "STOPLOSS"
    RETRY = "RETRY"
    ABORT = "ABORT"


class OrderLogStatus(StrEnum):
    """Outcome recorded in an `order_logs` row."""

    success = "success"
    failed = "failed"
    skipped = "skipped"


class TransactionType(StrEnum):
    """Side of a broker order (data model §5)."""

    BUY = "BUY"
    SELL = "SELL"


class LastAction(StrEnum):
    """Last order action taken for a strategy (data model §4.7)."""

    BUY = "BUY"
    SELL = "SELL"
    STOPLOSS = "STOPLOSS"


# --- Symbol -------------------------------------------------------------------

SYMBOL_PATTERN = r"^[A-Z0-9&_-]{1,30}$"
_SYMBOL_RE = re.compile(SYMBOL_PATTERN)


def _normalise_symbol(value: Any) -> Any:
    # Normalise before matching: pydantic applies pattern constraints before
    # its own strip/upper transforms, which would reject " infy ".
    return value.strip().upper() if isinstance(value, str) else value


def _check_symbol(value: str) -> str:
    if not _SYMBOL_RE.fullmatch(value):
        raise PydanticCustomError(
            "symbol_format",
            "symbol must be 1-30 characters of A-Z, 0-9, &, _ or -",
        )
    return value


Symbol = Annotated[
    str,
    Strict(),
    BeforeValidator(_normalise_symbol),
    AfterValidator(_check_symbol),
    WithJsonSchema({"type": "string", "pattern": SYMBOL_PATTERN, "examples": ["INFY"]}),
]
"""Exchange trading symbol, stripped and upper-cased (e.g. "INFY", "M&M")."""


# --- ClockTime ----------------------------------------------------------------

CLOCK_TIME_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]$"
_CLOCK_TIME_RE = re.compile(CLOCK_TIME_PATTERN)


def _parse_clock_time(value: Any) -> time:
    # Python callers (ORM rows) hand over datetime.time; wire input must be the
    # exact "HH:MM:SS" text, so "9:30" or "09:30" is an error, not a guess.
    if isinstance(value, time):
        if value.tzinfo is not None or value.microsecond:
            raise PydanticCustomError(
                "clock_time_format", "time must be a whole-second wall-clock time"
            )
        return value
    if isinstance(value, str) and _CLOCK_TIME_RE.fullmatch(value):
        hours, minutes, seconds = (int(part) for part in value.split(":"))
        return time(hours, minutes, seconds)
    raise PydanticCustomError("clock_time_format", "time must be formatted HH:MM:SS")


ClockTime = Annotated[
    time,
    PlainValidator(_parse_clock_time),
    PlainSerializer(lambda value: value.strftime("%H:%M:%S"), return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": CLOCK_TIME_PATTERN, "examples": ["09:30:00"]}),
]
"""Asia/Kolkata wall-clock time, "HH:MM:SS" on the wire, datetime.time in Python."""


# --- numbers ------------------------------------------------------------------

def _check_two_decimals(value: float) -> float:
    # repr() is the shortest text that round-trips the float, i.e. what the
    # user typed; counting its decimals avoids binary rounding surprises.
    try:
        exponent = Decimal(repr(value)).as_tuple().exponent
    except InvalidOperation:  # pragma: no cover - finiteness is checked first
        exponent = 0
    if not isinstance(exponent, int) or exponent < -2:
        raise PydanticCustomError(
            "stop_loss_precision", "stop_loss must have at most 2 decimal places"
        )
    return value


StopLoss = Annotated[
    float,
    Strict(),
    Field(gt=0, allow_inf_nan=False),
    AfterValidator(_check_two_decimals),
]
"""Stop-loss price: a finite number > 0 with at most 2 decimals (ints accepted)."""

Quantity = Annotated[int, Strict(), Field(ge=1, le=100_000)]
"""Order size in shares: an integer 1..100000; floats, strings and bools rejected."""


Price = Annotated[float, Field(allow_inf_nan=False)]
"""A finite market price."""


def require_buy_before_sell(buy_time: time | None, sell_time: time | None) -> None:
    """Raise ValueError unless buy_time is before sell_time (when both are set)."""
    if buy_time is not None and sell_time is not None and not buy_time < sell_time:
        raise ValueError("buy_time must be before sell_time")


# --- datetimes ----------------------------------------------------------------

def _to_utc(value: datetime) -> datetime:
    # One instant, one spelling: canonical JSON must not depend on the offset
    # the producer happened to use.
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""Timezone-aware datetime (ISO strings accepted), normalised to UTC."""


# --- broker credentials -------------------------------------------------------

_TOKEN_RE = re.compile(r"^\S{1,200}$")


def _check_token(value: str) -> str:
    if not _TOKEN_RE.fullmatch(value):
        raise PydanticCustomError(
            "broker_token_format", "must be 1-200 characters with no whitespace"
        )
    return value


def _check_secret_token(value: SecretStr) -> SecretStr:
    # Raised without the input so the secret never reaches an error body.
    _check_token(value.get_secret_value())
    return value


BrokerToken = Annotated[str, Strict(), AfterValidator(_check_token)]
"""Kite credential text: non-empty, no whitespace, at most 200 characters."""

SecretBrokerToken = Annotated[SecretStr, AfterValidator(_check_secret_token)]
"""BrokerToken kept in a SecretStr so repr() and logs show '**********'."""
