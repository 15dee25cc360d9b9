"""Model a running strategy in Redis: static config, live state, control messages."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from libs.schema.models.types import (
    ClockTime,
    LastAction,
    LockState,
    Position,
    Price,
    Quantity,
    StopLoss,
    StrategyStatus,
    Symbol,
    UtcDatetime,
    require_buy_before_sell,
)

__all__ = ["ControlMessage", "RuntimeState", "StrategyConfig", "StrategyLifecycle"]


class StrategyConfig(BaseModel):
    """Static config of a running strategy, stored as JSON in `strategy:{id}` (data model §2.1)."""

    # Unknown fields are ignored, not rejected: during a rolling deploy a newer
    # writer may add fields that an older reader must still load.
    model_config = ConfigDict(frozen=True, extra="ignore")

    strategy_id: UUID
    user_id: UUID
    symbol: Symbol
    buy_time: ClockTime
    sell_time: ClockTime
    stop_loss: StopLoss
    quantity: Quantity
    status: StrategyStatus
    run_id: str = Field(min_length=1, description="Identifies one start of the strategy.")
    exchange: str = "NSE"
    product: str = "MIS"
    instrument_token: int | None = None
    api_key_fp: str | None = Field(
        default=None, description="Fingerprint of the owner's Kite api_key, for rate limiting."
    )
    # Part of the run's plan (which day it trades), so every process plans it alike.
    weekdays: tuple[int, ...] | None = Field(
        default=None, description="Days of the week (0 = Monday) a repeating strategy trades on; None = every."
    )

    @model_validator(mode="after")
    def _check_times(self) -> Self:
        require_buy_before_sell(self.buy_time, self.sell_time)
        return self


class RuntimeState(BaseModel):
    """Live state of a strategy run, stored as the HASH `runtime:{id}` (data model §2.2).

    Writers HSET single fields (see `hash_fields`) rather than rewriting the
    whole hash; a field absent from the hash reads as None (or its default).
    """

    model_config = ConfigDict(extra="ignore")

    position: Position = Position.none
    last_price: Price | None = None
    last_buy_order: str | None = None
    last_sell_order: str | None = None
    lock_state: LockState = LockState.free
    updated_at: UtcDatetime | None = None
    last_action: LastAction | None = None
    # Shares held per the broker's confirmed fills (entry fills minus exit fills); written
    # with `position`. Absent on runs from before it existed: the config's quantity is held.
    filled_quantity: int | None = Field(default=None, ge=0)

    def to_redis_hash(self) -> dict[str, str]:
        """Return the hash fields as strings, leaving out None values."""
        encoded = self.model_dump(mode="json", exclude_none=True)
        return {name: value if isinstance(value, str) else str(value) for name, value in encoded.items()}

    @classmethod
    def hash_fields(cls, **changes: Any) -> dict[str, str]:
        """Validate some fields and return them encoded for HSET.

        A None value is left out, since a hash cannot hold it: HDEL the field
        to clear it.
        """
        unknown = set(changes) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"unknown runtime fields: {sorted(unknown)}")
        state = cls.model_validate(changes)
        encoded = state.to_redis_hash()
        return {name: encoded[name] for name in changes if name in encoded}

    @classmethod
    def from_redis_hash(cls, mapping: Mapping[bytes | str, bytes | str]) -> RuntimeState:
        """Build the state from an HGETALL reply (bytes or str keys and values)."""
        decoded = {_text(name): _text(value) for name, value in mapping.items()}
        return cls.model_validate(decoded)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StrategyLifecycle(BaseModel):
    """Lifecycle status of a strategy with its last start and stop (data model §6)."""

    model_config = ConfigDict(from_attributes=True)

    status: StrategyStatus
    started_at: datetime | None = None
    stopped_at: datetime | None = None


class ControlMessage(BaseModel):
    """Tell market listeners what changed, on the `control:strategies` stream.

    `started` carries symbol, stop_loss and run_id; `stopped` tells listeners
    to forget the strategy; `position` reports a new position (bought strategies
    are the only ones the stop-loss index watches).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    action: Literal["started", "stopped", "position"]
    strategy_id: UUID
    symbol: Symbol
    stop_loss: StopLoss | None = None
    position: Position | None = None
    run_id: str | None = None
