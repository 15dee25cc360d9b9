"""Add users.token_version (session revocation) and strategies.deleted_at (soft delete).

Revision ID: 0002
Revises: 0003 (re-chained on top of main's head when 0003 was merged first)
Create Date: 2026-11-29

Written out by hand and frozen, like 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("token_version", sa.Integer(), server_default="0", nullable=False))
    op.add_column("strategies", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("strategies", "deleted_at")
    op.drop_column("users", "token_version")
