"""A private stack for fault tests: they kill and restart its processes, Redis and Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.e2e.harness import Stack, Trader, running_stack

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


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("fault-stack"), FAULT_ENV, replicas=("executor",)) as stack:
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
