"""What handling one event decided: the log row, runtime change and follow-ups.

An Outcome is built by the handler and written by one commit script, so the
row, the runtime fields, the control message and any ABORT event land in
Redis together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from libs.schema import keys
from libs.schema.models import (
    AbortEvent,
    ControlMessage,
    Event,
    OrderLogRow,
    OrderLogStatus,
    RetryEvent,
    StrategyConfig,
    order_log_id,
)


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
    strategy_status: str | None = None
    failure_reason: str | None = None
    unload: StrategyConfig | None = None
    abort: AbortEvent | None = None
    retry: tuple[RetryEvent, int] | None = None
    extra_log: dict[str, Any] = field(default_factory=dict)

    @property
    def outcome_label(self) -> str:
        if self.abort is not None or self.strategy_status == "failed":
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
