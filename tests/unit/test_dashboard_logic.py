"""Plain-language validation messages and P&L from order-log rows (pure logic)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
from pydantic import ValidationError

from libs.schema.models import EventType, OrderLogStatus, StrategyCreateRequest, error_details
from libs.schema.models.messages import summary_message
from libs.schema.tables import OrderLog
from services.api.pnl import fills_from_rows, money, walk_fills

GOOD = {"symbol": "INFY", "buy_time": "09:30:00", "sell_time": "15:00:00", "stop_loss": 1400, "quantity": 10}


@pytest.mark.parametrize("change, loc, msg", [
    ({"quantity": 0}, ["quantity"], "must be at least 1"),
    ({"quantity": 1.5}, ["quantity"], "must be a whole number"),
    ({"stop_loss": -1}, ["stop_loss"], "must be more than 0"),
    ({"buy_time": "16:00:00"}, [], "buy_time must be before sell_time"),
    ({"extra": 1}, ["extra"], "is not a field this request accepts"),
])
def test_validation_messages_are_plain_words(change: dict, loc: list, msg: str) -> None:
    with pytest.raises(ValidationError) as caught:
        StrategyCreateRequest.model_validate(GOOD | change)
    details = error_details(caught.value)
    assert [(d["loc"], d["msg"]) for d in details] == [(loc, msg)]
    line = summary_message(details)
    assert "Input should" not in line and "Value error" not in line
    assert line.startswith(("Quantity", "Stop-loss", "buy_time", "Extra"))


def _row(sid: uuid.UUID, kind: str, price: float | None, at: int, **request: object) -> OrderLog:
    return OrderLog(id=uuid.uuid4(), strategy_id=sid, user_id=uuid.uuid4(), event_type=EventType(kind),
                    request_payload=dict(request), status=OrderLogStatus.success, trading_day=date(2026, 1, 5),
                    response_payload={"average_price": price, "filled_quantity": 4 if price else None},
                    created_at=datetime(2026, 1, 5, 4, tzinfo=UTC) + timedelta(seconds=at))


def test_retry_fills_count_as_the_order_they_retried() -> None:
    sid = uuid.uuid4()
    rows = [_row(sid, "BUY", 100.05, 0), _row(sid, "RETRY", 98.4, 5, retry_of="STOPLOSS")]
    fills = fills_from_rows(rows, default_quantity=9)
    assert (fills.entry_price, fills.exit_price, fills.quantity, fills.exit_kind) == (100.05, 98.4, 4,
                                                                                     EventType.STOPLOSS)
    assert money(fills, 120.0) == {"entry_average_price": 100.05, "exit_average_price": 98.4, "filled_quantity": 4,
                                   "realized_pnl": -6.6, "unrealized_pnl": None}
    assert walk_fills(rows, {})[1].pnl == -6.6


def test_open_position_is_marked_to_the_last_price_and_skips_unfilled_rows() -> None:
    sid = uuid.uuid4()
    skipped = _row(sid, "SELL", 101.0, 9)
    skipped.status = OrderLogStatus.skipped
    fills = fills_from_rows([_row(sid, "BUY", 100.0, 0), skipped], default_quantity=4)
    assert fills.position.value == "bought"
    assert money(fills, 101.25)["unrealized_pnl"] == 5.0
    assert money(fills, None)["unrealized_pnl"] is None
