"""Fixtures shared by the integration tests (executor, and the simulator's own)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from kiteconnect import KiteConnect
from sqlalchemy.ext.asyncio import AsyncEngine

from services.executor.settings import ExecutorSettings
from tests.integration.executor_support import engine_for, executor_settings
from tests.support.kite_sim import SimAdmin


@pytest.fixture
async def engine(clean_db: str) -> AsyncIterator[AsyncEngine]:
    """An async engine on the clean test database."""
    engine = engine_for(clean_db)
    yield engine
    await engine.dispose()


@pytest.fixture
def settings(redis_url: str, clean_db: str, sim: SimAdmin) -> Iterator[ExecutorSettings]:
    """Executor settings tuned for fast tests; releases any request the simulator still holds after."""
    yield executor_settings(redis_url, clean_db, sim.base_url)
    sim.set_faults()


@pytest.fixture
def paper_account(sim: SimAdmin) -> dict[str, Any]:
    """A fresh paper account on the (reset) session simulator."""
    return sim.create_account()


@pytest.fixture
def paper_kite(sim: SimAdmin, paper_account: dict[str, Any]) -> KiteConnect:
    """The official client, logged in as `paper_account`, pointed at the session simulator."""
    return KiteConnect(paper_account["api_key"], access_token=paper_account["access_token"], root=sim.base_url,
                       timeout=10)
