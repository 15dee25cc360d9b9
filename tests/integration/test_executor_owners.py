"""A run started while the executor runs: its owner and credentials are learned before its first event."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.schema import keys
from libs.schema.models import Position
from tests.integration.executor_support import (
    enqueue,
    executor_settings,
    new_account,
    running_executor,
    runtime,
    start_run,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin

pytestmark = pytest.mark.timeout(60)


async def test_started_run_owner_is_learned_from_the_control_stream(redis: Redis, engine: AsyncEngine,
                                                                     sim: SimAdmin, clean_db: str,
                                                                     redis_url: str) -> None:
    async with running_executor(executor_settings(redis_url, clean_db, sim.base_url)) as service:
        # Started after the executor's start-up reconciliation: only the control stream tells it.
        account = await new_account(sim, engine, redis)
        run = await start_run(engine, redis, account)
        user = str(account.user_id)
        await eventually(lambda: service.credentials.fingerprint_hint(user) == account.api_key_fp, timeout=10,
                         message="the started run's credentials were not read ahead of its first event")
        assert service.owners.learned >= 1
        # Its config was parsed ahead too, from the same bytes the lock-read will return.
        assert service.handler._configs[run.sid] == (await redis.get(keys.strategy_key(run.sid)), run.config)
        # Only a hint: a stale owner never stands in for the config read under the lock.
        service.handler.remember([run.config.model_copy(update={"user_id": "00000000-0000-0000-0000-000000000001"})])
        await enqueue(redis, run.buy())

        async def bought() -> bool:
            return (await runtime(redis, run)).position == Position.bought
        await eventually(bought, timeout=15)
        assert await redis.exists(keys.strategy_key(run.sid))
