"""Token state of broker credentials; repeating strategies.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-29

Written out by hand and frozen, like 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("broker_credentials",
                  sa.Column("token_state", sa.String(16), server_default="unknown", nullable=False))
    op.add_column("broker_credentials", sa.Column("token_checked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("broker_credentials", sa.Column("token_issued_at", sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint("ck_broker_credentials_token_state_known", "broker_credentials",
                               "token_state IN ('valid', 'expired', 'unknown')")
    # Tokens stored before this revision: valid ones keep working until the broker says otherwise.
    op.execute("UPDATE broker_credentials SET token_state = CASE WHEN is_valid THEN 'valid' ELSE 'expired' END")
    op.add_column("strategies", sa.Column("repeat", sa.String(16), server_default="once", nullable=False))
    op.add_column("strategies", sa.Column("weekdays", sa.ARRAY(sa.Integer()), nullable=True))
    op.create_check_constraint("ck_strategies_repeat_known", "strategies", "repeat IN ('once', 'trading_days')")


def downgrade() -> None:
    op.drop_constraint("ck_strategies_repeat_known", "strategies", type_="check")
    op.drop_column("strategies", "weekdays")
    op.drop_column("strategies", "repeat")
    op.drop_constraint("ck_broker_credentials_token_state_known", "broker_credentials", type_="check")
    op.drop_column("broker_credentials", "token_issued_at")
    op.drop_column("broker_credentials", "token_checked_at")
    op.drop_column("broker_credentials", "token_state")
