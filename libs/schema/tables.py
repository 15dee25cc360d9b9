"""Declare the Postgres tables (data model §1) as SQLAlchemy 2.0 typed models.

Postgres holds intent: users, their broker credentials, strategies and the
order log. Column names are the data model's (docs/data-model.md); extra columns are noted where they
are declared. Check constraints repeat the pydantic validation so that a row
written by any path obeys the same rules. The alembic migrations in
`libs/schema/migrations` must produce exactly this schema (a test compares).
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, time
from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    Time,
    Uuid,
    false,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.schema.models.types import EventType, OrderLogStatus, StrategyStatus

__all__ = ["Base", "BrokerCredential", "NotificationSettings", "OrderLog", "Strategy", "User"]

# Deterministic constraint names, so migrations can refer to them and the
# model/migration comparison does not trip over generated names.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every Tickwise table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _pg_enum(enum_class: type, name: str) -> Enum:
    # Store the enum *values* ("created"), which is what docs/data-model.md spells.
    return Enum(
        enum_class,
        name=name,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


STRATEGY_STATUS = _pg_enum(StrategyStatus, "strategy_status")
ORDER_EVENT_TYPE = _pg_enum(EventType, "order_event_type")
ORDER_LOG_STATUS = _pg_enum(OrderLogStatus, "order_log_status")


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def _updated_at() -> Mapped[datetime]:
    # onupdate is applied by the ORM; raw SQL updates must set it themselves.
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now())


class User(Base):
    """A registered user (data model §1.1)."""

    __tablename__ = "users"
    __table_args__ = (
        # Emails are stored lower-cased, so a plain unique constraint is
        # case-insensitive in effect; the check keeps every writer honest.
        CheckConstraint("email = lower(email)", name="email_lower_case"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    email: Mapped[str] = mapped_column(String(320), nullable=False, unique=True)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    # Extra: carried in every access token; bumping it (password change, account
    # deletion) revokes every token issued before.
    token_version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0", default=0)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class BrokerCredential(Base):
    """A user's Kite credentials, encrypted at rest (data model §1.2); one per user."""

    __tablename__ = "broker_credentials"
    __table_args__ = (
        CheckConstraint("token_state IN ('valid', 'expired', 'unknown')", name="token_state_known"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    # api_key, api_secret, access_token hold AES-256-GCM ciphertext (text).
    api_key: Mapped[str] = mapped_column(Text, nullable=False)
    api_secret: Mapped[str] = mapped_column(Text, nullable=False)
    # Null between connecting with api_key/secret and the login redirect.
    access_token: Mapped[str | None] = mapped_column(Text, nullable=True)
    is_valid: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false(), default=False)
    # Extra: id of the key that encrypted the row, so keys can be rotated.
    key_id: Mapped[str] = mapped_column(String(64), nullable=False)
    # Extra: last characters of the api_key, to show the user which key is stored.
    api_key_hint: Mapped[str] = mapped_column(String(16), nullable=False)
    # Extra: sha256 hex prefix of the api_key, names its rate-limit bucket.
    api_key_fp: Mapped[str] = mapped_column(String(64), nullable=False)
    # Extra: the Kite profile the token belongs to.
    broker_user_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    broker_user_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Extra (0003): the access token's daily life. `token_state` is the broker's last answer
    # (valid / expired = TokenException / unknown = never asked or the broker did not answer);
    # `token_issued_at` is when the stored token was accepted (it dies at the next 06:00 IST).
    token_state: Mapped[str] = mapped_column(String(16), nullable=False, server_default="unknown",
                                             default="unknown")
    token_checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    token_issued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class Strategy(Base):
    """A user's scheduled buy/sell strategy and its lifecycle (data model §1.3, §6)."""

    __tablename__ = "strategies"
    __table_args__ = (
        CheckConstraint("quantity BETWEEN 1 AND 100000", name="quantity_range"),
        CheckConstraint("stop_loss > 0", name="stop_loss_positive"),
        CheckConstraint("buy_time < sell_time", name="buy_before_sell"),
        CheckConstraint("symbol ~ '^[A-Z0-9&_-]{1,30}$'", name="symbol_format"),
        CheckConstraint("repeat IN ('once', 'trading_days')", name="repeat_known"),
        Index("ix_strategies_user_id", "user_id"),
        Index("ix_strategies_status", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    symbol: Mapped[str] = mapped_column(String(30), nullable=False)
    buy_time: Mapped[time] = mapped_column(Time(timezone=False), nullable=False)
    sell_time: Mapped[time] = mapped_column(Time(timezone=False), nullable=False)
    stop_loss: Mapped[float] = mapped_column(Double, nullable=False)
    quantity: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[StrategyStatus] = mapped_column(
        STRATEGY_STATUS, nullable=False, server_default=StrategyStatus.created.value, default=StrategyStatus.created
    )
    # Extras: where and how orders are placed.
    exchange: Mapped[str] = mapped_column(String(10), nullable=False, server_default="NSE", default="NSE")
    product: Mapped[str] = mapped_column(String(10), nullable=False, server_default="MIS", default="MIS")
    # Extras: the current/last run (started_at is the run_id) and why it failed.
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Extra: soft delete. A deleted strategy is gone from every read but its order
    # log, which is the audit trail of real orders and must outlive it.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Extras (0003): `once` trades one run per start; `trading_days` re-arms after every run
    # for the next trading day, on `weekdays` only when set (0 = Monday ... 6 = Sunday).
    repeat: Mapped[str] = mapped_column(String(16), nullable=False, server_default="once", default="once")
    weekdays: Mapped[list[int] | None] = mapped_column(ARRAY(Integer), nullable=True)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class OrderLog(Base):
    """One recorded order action of a strategy (data model §1.4).

    `id` is derived from the stream entry (`order_log_id`), so the Postgres
    writer inserts with ON CONFLICT (id) DO NOTHING and re-deliveries are free.
    """

    __tablename__ = "order_logs"
    __table_args__ = (Index("ix_order_logs_user_id", "user_id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    strategy_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("strategies.id", ondelete="CASCADE"), nullable=False
    )
    event_type: Mapped[EventType] = mapped_column(ORDER_EVENT_TYPE, nullable=False)
    request_payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    response_payload: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    status: Mapped[OrderLogStatus] = mapped_column(ORDER_LOG_STATUS, nullable=False)
    created_at: Mapped[datetime] = _created_at()
    # Extras: owner (for per-user queries), day, broker's order id, order tag,
    # and the queue:orders entry the row came from.
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    trading_day: Mapped[date] = mapped_column(Date, nullable=False)
    broker_order_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tag: Mapped[str | None] = mapped_column(String(20), nullable=True)
    stream_msg_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class NotificationSettings(Base):
    """Where a user's notifications go: a signed webhook and/or a Telegram chat (one row per user)."""

    __tablename__ = "notification_settings"

    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    webhook_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    # AES-256-GCM ciphertext of the HMAC signing secret (shown to the user once).
    webhook_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    telegram_chat_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Id of the key that encrypted webhook_secret.
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


# A strategy's log is read newest first; declared here because it needs the
# mapped column to express DESC.
Index("ix_order_logs_strategy_id_created_at", OrderLog.strategy_id, OrderLog.created_at.desc())
