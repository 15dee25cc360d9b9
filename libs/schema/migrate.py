"""Apply the alembic migrations from code (test fixtures, `make up`).

    from libs.schema.migrate import upgrade_head
    upgrade_head("postgresql+psycopg://postgres@127.0.0.1:5432/tickwise")
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

__all__ = ["MIGRATIONS_DIR", "alembic_config", "downgrade_base", "sync_database_url", "upgrade_head"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_SYNC_DRIVER = "postgresql+psycopg://"


def sync_database_url(url: str) -> str:
    """Return url with the psycopg 3 driver, the one migrations run on.

    Accepts bare `postgresql://`/`postgres://` URLs and the async
    `postgresql+asyncpg://` spelling of the same database.
    """
    for prefix in ("postgresql+asyncpg://", "postgresql+psycopg_async://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return _SYNC_DRIVER + url[len(prefix):]
    return url


def alembic_config(database_url: str) -> Config:
    """Return an alembic Config for our migrations, independent of the cwd and alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not a main option: ConfigParser would treat a
    # '%' in a URL-encoded password as interpolation.
    config.attributes["database_url"] = database_url
    return config


def upgrade_head(database_url: str) -> None:
    """Migrate the database at database_url to the newest revision."""
    command.upgrade(alembic_config(database_url), "head")


def downgrade_base(database_url: str) -> None:
    """Undo every migration, leaving an empty schema (tests only)."""
    command.downgrade(alembic_config(database_url), "base")
