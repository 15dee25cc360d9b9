"""Create users, broker_credentials, strategies and order_logs.

Revision ID: 0001
Revises:
Create Date: 2025-02-25

Written out by hand and frozen: it must not import libs.schema.tables, whose
later changes belong in later revisions.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

strategy_status = postgresql.ENUM(
    "created", "running", "stopped", "exited", "failed", name="strategy_status", create_type=False
)
order_event_type = postgresql.ENUM(
    "BUY", "SELL", "STOPLOSS", "RETRY", "ABORT", name="order_event_type", create_type=False
)
order_log_status = postgresql.ENUM("success", "failed", "skipped", name="order_log_status", create_type=False)


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    strategy_status.create(bind, checkfirst=True)
    order_event_type.create(bind, checkfirst=True)
    order_log_status.create(bind, checkfirst=True)

    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("email", name="uq_users_email"),
        sa.CheckConstraint("email = lower(email)", name="ck_users_email_lower_case"),
    )

    op.create_table(
        "broker_credentials",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("api_key", sa.Text(), nullable=False),
        sa.Column("api_secret", sa.Text(), nullable=False),
        sa.Column("access_token", sa.Text(), nullable=True),
        sa.Column("is_valid", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("api_key_hint", sa.String(16), nullable=False),
        sa.Column("api_key_fp", sa.String(64), nullable=False),
        sa.Column("broker_user_id", sa.String(64), nullable=True),
        sa.Column("broker_user_name", sa.String(200), nullable=True),
        *_timestamps(),
        sa.PrimaryKeyConstraint("user_id", name="pk_broker_credentials"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_broker_credentials_user_id_users", ondelete="CASCADE"
        ),
    )

    op.create_table(
        "strategies",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("symbol", sa.String(30), nullable=False),
        sa.Column("buy_time", sa.Time(timezone=False), nullable=False),
        sa.Column("sell_time", sa.Time(timezone=False), nullable=False),
        sa.Column("stop_loss", sa.Double(), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("status", strategy_status, server_default="created", nullable=False),
        sa.Column("exchange", sa.String(10), server_default="NSE", nullable=False),
        sa.Column("product", sa.String(10), server_default="MIS", nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_strategies"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_strategies_user_id_users", ondelete="CASCADE"),
        sa.CheckConstraint("quantity BETWEEN 1 AND 100000", name="ck_strategies_quantity_range"),
        sa.CheckConstraint("stop_loss > 0", name="ck_strategies_stop_loss_positive"),
        sa.CheckConstraint("buy_time < sell_time", name="ck_strategies_buy_before_sell"),
        sa.CheckConstraint("symbol ~ '^[A-Z0-9&_-]{1,30}$'", name="ck_strategies_symbol_format"),
    )
    op.create_index("ix_strategies_user_id", "strategies", ["user_id"])
    op.create_index("ix_strategies_status", "strategies", ["status"])

    op.create_table(
        "order_logs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("strategy_id", sa.Uuid(), nullable=False),
        sa.Column("event_type", order_event_type, nullable=False),
        sa.Column("request_payload", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("response_payload", postgresql.JSONB(), nullable=True),
        sa.Column("status", order_log_status, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("trading_day", sa.Date(), nullable=False),
        sa.Column("broker_order_id", sa.String(64), nullable=True),
        sa.Column("tag", sa.String(20), nullable=True),
        sa.Column("stream_msg_id", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_order_logs"),
        sa.ForeignKeyConstraint(
            ["strategy_id"], ["strategies.id"], name="fk_order_logs_strategy_id_strategies", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_order_logs_user_id_users", ondelete="CASCADE"),
    )
    op.create_index(
        "ix_order_logs_strategy_id_created_at", "order_logs", ["strategy_id", sa.text("created_at DESC")]
    )
    op.create_index("ix_order_logs_user_id", "order_logs", ["user_id"])


def downgrade() -> None:
    op.drop_table("order_logs")
    op.drop_table("strategies")
    op.drop_table("broker_credentials")
    op.drop_table("users")
    bind = op.get_bind()
    order_log_status.drop(bind, checkfirst=True)
    order_event_type.drop(bind, checkfirst=True)
    strategy_status.drop(bind, checkfirst=True)
