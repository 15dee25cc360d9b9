"""A private stack for fault tests: they kill and restart its processes, Redis and Postgres."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.e2e.harness import Stack, Trader
from tests.support.postgres import open_to_postgres

# Short enough for tests to see take-overs within seconds; long against normal handling.
FAULT_ENV = {
    "TICKWISE_CLAIM_IDLE_MS": "2000",
    "TICKWISE_CLAIM_INTERVAL_S": "0.5",
    "TICKWISE_LOCK_TTL_MS": "3000",
    "TICKWISE_BROKER_TIMEOUT_S": "2",
    "TICKWISE_RETRY_BASE_S": "0.3",
    "TICKWISE_RETRY_CAP_S": "2",
    "TICKWISE_WRITER_BACKOFF_MAX_S": "1",
}


@contextlib.contextmanager
def private_stack(tmp_path_factory: pytest.TempPathFactory, name: str, settings: dict[str, str]) -> Iterator[Stack]:
    """Run a stack (two executors) with `settings` in its environment, in a fresh temp dir."""
    run_dir = tmp_path_factory.mktemp(name)
    open_to_postgres(run_dir)
    with pytest.MonkeyPatch.context() as env:
        for key, value in settings.items():
            env.setenv(key, value)  # the stack hands its environment to every process it starts
        stack = Stack(run_dir)
        try:
            stack.up()
            stack.add_replica("executor")
            yield stack
        finally:
            stack.down()


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with private_stack(tmp_path_factory, "fault-stack", FAULT_ENV) as stack:
        yield stack


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
async def trader(fault_stack: Stack, http: aiohttp.ClientSession) -> AsyncIterator[Trader]:
    trader = await Trader(http, fault_stack).sign_up()
    yield trader
    await trader.sim("POST", "faults", {})


@pytest.fixture
async def stack_redis(fault_stack: Stack) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(fault_stack.redis_url)
    yield client
    await client.aclose()
