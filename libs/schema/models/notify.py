"""Model notifications: what happened to a user's trading, as sent to their webhook or Telegram chat.

A Notice's `id` is deterministic where the event is (an order fill's id is its
order-log row's id), so a receiver that sees the same id twice drops the
second: delivery is at least once, the id makes it once for the receiver.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from libs.schema.models.types import UtcDatetime

__all__ = ["Notice", "NoticeType", "NotificationSettingsIn", "NotificationSettingsOut"]

NoticeType = Literal["order_filled", "run_failed", "token_expired", "kill_switch", "test"]


class Notice(BaseModel):
    """One event worth telling a user about."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(min_length=1, max_length=100, description="Deduplication id: the same event, the same id.")
    type: NoticeType
    user_id: UUID
    occurred_at: UtcDatetime
    strategy_id: UUID | None = None
    symbol: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    def text(self) -> str:
        """Return the notice as one short message for a chat."""
        d = self.data
        if self.type == "order_filled":
            kind = {"BUY": "Bought", "SELL": "Sold", "STOPLOSS": "Stop-loss exit: sold"}.get(d.get("kind"), "Filled")
            line = f"{kind} {d.get('quantity')} {self.symbol} at ₹{d.get('price')}"
            if d.get("pnl") is not None:
                line += f" (P&L ₹{d['pnl']})"
            return line
        if self.type == "run_failed":
            return f"{self.symbol or 'A strategy'} stopped trading: {d.get('reason')}"
        if self.type == "token_expired":
            return "Your Kite access token has expired: log in to Kite again to keep trading."
        if self.type == "kill_switch":
            return "Kill switch used: every strategy is being stopped."
        return "Tickwise test notification."


class NotificationSettingsIn(BaseModel):
    """Set where notifications go; a field left out keeps its value, null turns that channel off."""

    model_config = ConfigDict(extra="forbid")

    webhook_url: AnyHttpUrl | None = Field(None, description="JSON POST target, signed with HMAC-SHA256.")
    telegram_chat_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^-?[0-9]{1,20}$|^@[A-Za-z0-9_]{5,32}$")

    @field_validator("webhook_url")
    @classmethod
    def _no_credentials(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if value is not None and (value.username or value.password):
            raise ValueError("the URL must not contain a user name or password")
        if value is not None and len(str(value)) > 2000:
            raise ValueError("the URL must be at most 2000 characters long")
        return value


class NotificationSettingsOut(BaseModel):
    """Where notifications go. `webhook_secret` is present once: when it was just created."""

    webhook_url: str | None = None
    telegram_chat_id: str | None = None
    telegram_available: bool = Field(description="Whether the operator configured a Telegram bot.")
    webhook_secret: str | None = Field(None, description="Shown once; sign check: HMAC-SHA256(secret, ts + '.' + body).")
    updated_at: datetime | None = None
