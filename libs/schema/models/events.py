"""Model the events on `queue:orders` and in the `schedule` ZSET (data model §3).

`Event` is a union discriminated on `event_type`. `parse_event` is the one
way to read an event off the wire; `event_to_json` the one way to write it,
canonically, because the scheduler uses those bytes as a ZSET member.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from libs.schema import codec
from libs.schema.models.types import EventType, Price, UtcDatetime

__all__ = [
    "AbortEvent",
    "BuyEvent",
    "Event",
    "MalformedEvent",
    "RetryEvent",
    "SellEvent",
    "StoplossEvent",
    "event_to_json",
    "format_validation_error",
    "parse_event",
]

# The original schema listed SAFETY_ABORT among queue events and called it ABORT elsewhere
# (docs/data-model.md §8).
# Both are read; ABORT is what we write.
_EVENT_TYPE_ALIASES = {"SAFETY_ABORT": EventType.ABORT.value}


class MalformedEvent(ValueError):
    """An event could not be parsed; `reason` says why in plain words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _EventBase(BaseModel):
    # Extra fields are ignored so that an older executor can still read events
    # from a newer scheduler during a rolling deploy (and the original schema's
    # `timestamp` field does not poison an entry).
    model_config = ConfigDict(frozen=True, extra="ignore")

    strategy_id: UUID
    run_id: str = Field(min_length=1, description="Identifies one start of the strategy.")
    trading_day: date
    attempt: Annotated[int, Field(ge=1, strict=True)] = 1
    price: Price | None = None
    trigger_time: UtcDatetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class BuyEvent(_EventBase):
    """Buy `quantity` at market: due at the strategy's buy_time."""

    event_type: Literal[EventType.BUY] = EventType.BUY


class SellEvent(_EventBase):
    """Sell the position at market: due at the strategy's sell_time."""

    event_type: Literal[EventType.SELL] = EventType.SELL


class StoplossEvent(_EventBase):
    """Sell the position now: the live price fell to the stop-loss."""

    event_type: Literal[EventType.STOPLOSS] = EventType.STOPLOSS
    trigger_price: Price = Field(gt=0, description="Last traded price that crossed the stop-loss.")


_RETRYABLE = frozenset({EventType.BUY, EventType.SELL, EventType.STOPLOSS})


def _check_retryable(value: EventType) -> EventType:
    if value not in _RETRYABLE:
        raise PydanticCustomError("retry_of_invalid", "retry_of must be BUY, SELL or STOPLOSS")
    return value


class RetryEvent(_EventBase):
    """Try an earlier BUY, SELL or STOPLOSS again; `attempt` counts up."""

    event_type: Literal[EventType.RETRY] = EventType.RETRY
    retry_of: Annotated[EventType, AfterValidator(_check_retryable)]


def _unalias_event_type(value: Any) -> Any:
    return _EVENT_TYPE_ALIASES.get(value, value) if isinstance(value, str) else value


class AbortEvent(_EventBase):
    """Give up on the strategy run: it ends `failed`, loudly, with `reason`."""

    event_type: Annotated[Literal[EventType.ABORT], BeforeValidator(_unalias_event_type)] = (
        EventType.ABORT
    )
    reason: str = Field(min_length=1)


def _event_tag(value: Any) -> str | None:
    kind = value.get("event_type") if isinstance(value, dict) else getattr(value, "event_type", None)
    if isinstance(kind, EventType):
        return kind.value
    return _unalias_event_type(kind) if isinstance(kind, str) else None


Event = Annotated[
    Annotated[BuyEvent, Tag(EventType.BUY.value)]
    | Annotated[SellEvent, Tag(EventType.SELL.value)]
    | Annotated[StoplossEvent, Tag(EventType.STOPLOSS.value)]
    | Annotated[RetryEvent, Tag(EventType.RETRY.value)]
    | Annotated[AbortEvent, Tag(EventType.ABORT.value)],
    Discriminator(
        _event_tag,
        custom_error_type="event_type_invalid",
        custom_error_message="event_type must be one of BUY, SELL, STOPLOSS, RETRY, ABORT",
    ),
]
"""Any event on `queue:orders`, chosen by its `event_type`."""

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def format_validation_error(error: ValidationError) -> str:
    """Return a one-line summary of a ValidationError: `loc: message; ...`."""
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in item["loc"]) or "<root>"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def parse_event(raw: bytes | bytearray | memoryview | str | dict[str, Any]) -> Event:
    """Parse an event from JSON bytes/text or a dict; raise MalformedEvent if invalid."""
    if isinstance(raw, (bytes, bytearray, memoryview, str)):
        try:
            raw = codec.loads(raw)
        except ValueError as error:
            raise MalformedEvent(f"event is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise MalformedEvent(f"event must be a JSON object, not {type(raw).__name__}")
    try:
        return EVENT_ADAPTER.validate_python(raw)
    except ValidationError as error:
        raise MalformedEvent(format_validation_error(error)) from error


def event_to_json(event: Event) -> bytes:
    """Return the canonical JSON of an event (sorted keys, UTC datetimes)."""
    return codec.dumps(event)
