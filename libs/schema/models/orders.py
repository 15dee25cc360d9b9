"""Model broker orders and the order-log rows the executor records (data model §5, §1.4)."""

from __future__ import annotations

from datetime import date
from typing import Any, Literal
from uuid import UUID, uuid5

from pydantic import BaseModel, ConfigDict, Field

from libs.schema.models.types import EventType, OrderLogStatus, Quantity, Symbol, TransactionType, UtcDatetime

__all__ = ["ORDER_LOG_NAMESPACE", "BrokerOrder", "OrderLogRow", "order_log_id"]

TAG_PATTERN = r"^[A-Za-z0-9]{1,20}$"


class BrokerOrder(BaseModel):
    """A market order as sent to Kite (data model §5), with its idempotency tag."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    symbol: Symbol
    quantity: Quantity
    transaction_type: TransactionType
    order_type: Literal["MARKET"] = "MARKET"
    trigger_price: None = None
    exchange: str = "NSE"
    product: str = "MIS"
    # Kite tags are alphanumeric and at most 20 characters.
    tag: str = Field(pattern=TAG_PATTERN, description="Deterministic tag of the order intent.")

    def kite_params(self) -> dict[str, Any]:
        """Return keyword arguments for `KiteConnect.place_order` (variety aside)."""
        return {
            "exchange": self.exchange,
            "tradingsymbol": self.symbol,
            "transaction_type": self.transaction_type.value,
            "quantity": self.quantity,
            "product": self.product,
            "order_type": self.order_type,
            "tag": self.tag,
        }


# Fixed forever: changing it would give re-delivered rows new ids and let the
# Postgres writer insert them twice.
ORDER_LOG_NAMESPACE = UUID("6f1c3d2e-8a4b-5c7d-9e0f-1a2b3c4d5e6f")


def order_log_id(stream_name: str, msg_id: bytes | str, part: str = "") -> UUID:
    """Return the deterministic order_logs row id for a stream entry.

    The same entry always yields the same id, so inserting with
    ON CONFLICT (id) DO NOTHING is idempotent. Pass `part` when one entry
    produces several rows (e.g. "placed", "filled") to tell them apart.
    """
    msg_text = msg_id.decode() if isinstance(msg_id, bytes) else msg_id
    name = f"{stream_name}/{msg_text}" + (f"/{part}" if part else "")
    return uuid5(ORDER_LOG_NAMESPACE, name)


class OrderLogRow(BaseModel):
    """One `order_logs` row, as the executor writes it to `queue:order_logs`."""

    model_config = ConfigDict(frozen=True, extra="ignore", from_attributes=True)

    id: UUID
    strategy_id: UUID
    # None when the executor skipped an event of a run no longer loaded (it
    # cannot know the owner then); the Postgres writer fills it in from
    # `strategies.user_id`.
    user_id: UUID | None = None
    event_type: EventType
    request_payload: dict[str, Any] = Field(default_factory=dict)
    response_payload: dict[str, Any] = Field(default_factory=dict)
    status: OrderLogStatus
    trading_day: date
    broker_order_id: str | None = None
    tag: str | None = None
    stream_msg_id: str | None = Field(default=None, description="Id of the queue:orders entry handled.")
    created_at: UtcDatetime
    # Terminal outcome of the run, applied to `strategies` by the Postgres
    # writer in the same transaction as the insert (the order path never
    # writes Postgres). `run_id` scopes it to one start of the strategy.
    run_id: str | None = None
    strategy_status: Literal["exited", "failed"] | None = None
    failure_reason: str | None = None
