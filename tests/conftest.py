"""Session fixtures: a real redis-server and a real Postgres on free ports in temp dirs.

Each test gets clean state: Redis is flushed and every table truncated before it runs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from deploy.local.procs import PostgresServer, RedisServer, free_port
from tests.support.postgres import open_to_postgres

# Strategy times are IST wall-clock times of one day, buy before sell: a test
# that schedules "now - 5 min .. now + 5 min" cannot be written across IST
# midnight. A suite started in this window waits for the new day instead of
# failing a dozen tests; the window covers the suite's length plus those offsets.
MIDNIGHT_WINDOW_BEFORE = timedelta(minutes=20)
MIDNIGHT_WINDOW_AFTER = timedelta(minutes=6)


def seconds_until_clear_of_ist_midnight(now: datetime) -> float:
    """Return how long to wait so no test's strategy window crosses IST midnight (0 if clear)."""
    from libs.trading.calendar import IST

    local = now.astimezone(IST)
    next_midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), IST)
    last_midnight = next_midnight - timedelta(days=1)
    if next_midnight - local <= MIDNIGHT_WINDOW_BEFORE:
        return (next_midnight + MIDNIGHT_WINDOW_AFTER - local).total_seconds()
    if local - last_midnight < MIDNIGHT_WINDOW_AFTER:
        return (last_midnight + MIDNIGHT_WINDOW_AFTER - local).total_seconds()
    return 0.0


def pytest_sessionstart(session: pytest.Session) -> None:
    from libs.trading.calendar import IST

    wait = seconds_until_clear_of_ist_midnight(datetime.now(IST))
    if wait > 0:
        print(f"\ntickwise: IST midnight is near; waiting {wait:.0f} s so no strategy window spans two days",
              flush=True)
        time.sleep(wait)


@pytest.fixture(scope="session")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tickwise")
    open_to_postgres(root)
    return root


@pytest.fixture(scope="session")
def redis_server(run_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(run_root / "redis", free_port())
    server.start(appendonly=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def pg_server(run_root: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(run_root / "pg", free_port())
    server.start(fsync=False)
    yield server
    server.stop(mode="immediate")


@pytest.fixture(scope="session")
def database_url(pg_server: PostgresServer) -> str:
    from libs.schema.migrate import upgrade_head

    upgrade_head(pg_server.url)
    return pg_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def clean_db(database_url: str) -> str:
    """Truncate every table; return the database URL."""
    import psycopg

    from libs.schema.tables import Base

    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {names} CASCADE")
    return database_url


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    """One Kite simulator subprocess for the session (tests that need a private one start their own)."""
    from tests.support.kite_sim import run_sim

    with run_sim(tick_interval_ms=0) as url:
        yield url


@pytest.fixture
def sim(sim_url: str):
    """The session simulator, reset (accounts, orders, faults, prices) before the test."""
    from tests.support.kite_sim import SimAdmin

    admin = SimAdmin(sim_url)
    admin.reset()
    return admin
