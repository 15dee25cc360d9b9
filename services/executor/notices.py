"""The notification an outcome deserves, if any: order filled, run failed, or the broker token expired.

Built here and XADDed to `notify:events` by the same commit script that
writes the outcome (no extra round trip, and no notice without its outcome).
Its id is the order-log row's id, which is derived from the stream entry: a
redelivered event yields the same id, so receivers can drop repeats.
"""

from __future__ import annotations

from typing import Any

from libs.schema.codec import dumps
from libs.schema.models import Event, OrderLogRow, OrderLogStatus, StrategyConfig
from libs.schema.models.notify import Notice
from services.executor.outcome import Outcome

_FILL_KIND = {"bought": "BUY", "sold": "SELL", "exited_by_sl": "STOPLOSS"}


def outcome_notice(event: Event, outcome: Outcome, config: StrategyConfig | None, row: OrderLogRow,
                   runtime_before: dict[bytes, bytes]) -> bytes | None:
    """Return the JSON notice of this outcome for its user, or None."""
    if config is None or row.user_id is None:
        return None
    common: dict[str, Any] = {"id": str(row.id), "user_id": row.user_id, "occurred_at": row.created_at,
                              "strategy_id": config.strategy_id, "symbol": config.symbol}
    position = (outcome.runtime or {}).get("position")
    if outcome.status == OrderLogStatus.success and position in _FILL_KIND:
        price = outcome.response.get("average_price")
        quantity = outcome.response.get("filled_quantity") or config.quantity
        data: dict[str, Any] = {"kind": _FILL_KIND[position], "price": price, "quantity": quantity,
                                "order_id": outcome.order_id, "event_type": event.event_type.value}
        entry = _float(runtime_before.get(b"last_price"))
        if position != "bought" and entry is not None and price:
            data["entry_price"] = entry
            data["pnl"] = round((float(price) - entry) * int(quantity), 2)
        return dumps(Notice(type="order_filled", data=data, **common))
    if outcome.failure_reason:
        return dumps(Notice(type="run_failed", data={"reason": outcome.failure_reason}, **common))
    if outcome.response.get("error_kind") == "auth":
        return dumps(Notice(type="token_expired", data={"message": outcome.response.get("message")}, **common))
    return None


def _float(raw: bytes | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None
