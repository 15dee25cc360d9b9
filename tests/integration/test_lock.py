"""The API's stop and the executor's orders never overlap, even when either outlasts the lock's TTL.

Both take `lock_state:{id}` through `libs.trading.lock`, which renews it for as
long as its holder works. The TTL here is 300 ms and each side holds the lock
for seconds: without renewal the other side would take it after one TTL. The
API runs in-process on a test server, a real executor in-process trades on
the simulator; the stop is slowed by a Postgres row lock on the strategy (as a
concurrent edit would), the executor by the simulator's latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import psycopg
import pytest

from libs.schema import keys
from libs.schema.models import parse_event
from tests.integration import api_support
from tests.integration.api_support import ApiHarness, User, clock
from tests.integration.executor_support import executor_settings, running_executor
from tests.support.eventually import eventually

pytest_plugins = ["tests.integration.api_support"]

TTL_MS = 300
HOLD_S = 6 * TTL_MS / 1000  # how long each side keeps the lock in these tests: several TTLs


@pytest.fixture
async def api(api_factory: Any) -> ApiHarness:
    return await api_factory(stop_lock_ttl_ms=TTL_MS, stop_lock_wait_s=15.0)


@pytest.fixture
def exec_settings(redis_url: str, clean_db: str, sim: Any) -> Any:
    yield executor_settings(redis_url, clean_db, sim.base_url, secret_key=api_support.SECRET_KEY,
                            lock_ttl_ms=TTL_MS, lock_wait_s=15.0)
    sim.set_faults()


async def _started(api: ApiHarness) -> tuple[User, str]:
    user = await api.connected_user()
    sid = (await api.strategy(user, buy_time=clock(3600), sell_time=clock(7200)))["id"]
    await api.v1("POST", "/strategies/start", {"strategy_id": sid}, user=user, expect=200)
    return user, sid


async def _buy_now(redis: Any, sid: str) -> None:
    """Move the run's BUY from `schedule` to `queue:orders` now, as the scheduler does when it is due."""
    schedule = keys.schedule_key(keys.partition_of(sid))
    (buy,) = [m for m in await redis.zrange(schedule, 0, -1) if parse_event(m).event_type == "BUY"]
    assert await redis.zrem(schedule, buy)
    await redis.xadd(keys.orders_stream(keys.partition_of(sid)), {"event": buy})


async def _control_actions(redis: Any, sid: str) -> list[str]:
    entries = await redis.xrange(keys.control_stream(keys.partition_of(sid)))
    messages = [orjson.loads(fields[b"event"]) for _id, fields in entries]
    return [m["action"] for m in messages if m["strategy_id"] == sid]


async def _holder(redis: Any, sid: str) -> bytes | None:
    return await redis.get(keys.lock_key(sid))


async def _orders(api: ApiHarness, user: User) -> list[dict[str, Any]]:
    return await asyncio.to_thread(api.sim.orders, api_key=user.broker["api_key"])


@pytest.fixture
async def row_locked(clean_db: str) -> AsyncIterator[Any]:
    """Yield lock(strategy_id): hold its row FOR UPDATE until the test calls release()."""
    async with await psycopg.AsyncConnection.connect(clean_db.replace("postgresql+psycopg://", "postgresql://")) as conn:

        class RowLock:
            async def lock(self, sid: str) -> None:
                await conn.execute("SELECT 1 FROM strategies WHERE id = %s FOR UPDATE", (sid,))

            async def release(self) -> None:
                await conn.rollback()

        yield RowLock()
        await conn.rollback()


async def test_stop_waits_for_an_order_in_flight_longer_than_the_ttl(api: ApiHarness, redis: Any,
                                                                     exec_settings: Any) -> None:
    user, sid = await _started(api)
    async with running_executor(exec_settings):
        # Every broker call of the BUY (tag lookup, placement, fill check) takes 2 TTLs.
        api.sim.set_faults(latency_ms=2 * TTL_MS, routes=["orders"])
        await _buy_now(redis, sid)
        executor = await eventually(lambda: _holder(redis, sid), timeout=20, interval=0.005,
                                    message="the BUY never went in flight")
        assert executor.startswith(b"executor:")
        assert await redis.hget(keys.runtime_key(sid), "lock_state") == b"locked"
        stop = asyncio.create_task(api.v1("POST", "/strategies/stop", {"strategy_id": sid}, user=user))
        await asyncio.sleep(HOLD_S)  # the order stays in flight for several TTLs
        assert not stop.done() and await _holder(redis, sid) == executor  # renewed, never taken over
        reply = await asyncio.wait_for(stop, 30)
    assert reply.status == 200 and reply.body["status"] == "stopped", reply.text
    # The BUY was placed and committed (its `position` message) before the stop unloaded the run.
    assert await _control_actions(redis, sid) == ["started", "position", "stopped"]
    assert [o["transaction_type"] for o in await _orders(api, user)] == ["BUY"]
    assert not await redis.exists(keys.lock_key(sid), keys.runtime_key(sid), keys.strategy_key(sid))


async def test_an_order_waits_for_a_stop_that_holds_the_lock_longer_than_the_ttl(
        api: ApiHarness, redis: Any, exec_settings: Any, row_locked: Any) -> None:
    user, sid = await _started(api)
    async with running_executor(exec_settings):
        await row_locked.lock(sid)  # the stop takes the lock, then waits for the strategy's row
        stop = asyncio.create_task(api.v1("POST", "/strategies/stop", {"strategy_id": sid}, user=user))
        holder = await eventually(lambda: _holder(redis, sid), timeout=10, interval=0.005,
                                  message="the stop never took the lock")
        assert holder.startswith(b"api:")
        assert await redis.hget(keys.runtime_key(sid), "lock_state") == b"locked"
        await _buy_now(redis, sid)
        stream = keys.orders_stream(keys.partition_of(sid))
        await eventually(lambda: _pending(redis, stream, 1), timeout=10, message="no executor took the BUY")
        await asyncio.sleep(HOLD_S)  # the stop holds the lock for several TTLs
        assert await _holder(redis, sid) == holder  # renewed, never taken over
        assert await _orders(api, user) == []
        assert not stop.done()
        await row_locked.release()
        reply = await asyncio.wait_for(stop, 30)
        assert reply.status == 200 and reply.body["status"] == "stopped", reply.text
        # The executor then finds the run unloaded: the BUY is acked as skipped, never sent.
        await eventually(lambda: _pending(redis, stream, 0), timeout=20)
    assert await _orders(api, user) == []
    logs = (await api.v1("GET", f"/strategies/{sid}/orders", user=user, expect=200)).body
    assert [(r["event_type"], r["status"]) for r in logs] == [("BUY", "skipped")]
    assert await _control_actions(redis, sid) == ["started", "stopped"]


async def test_a_stop_that_lost_the_lock_changes_nothing(api: ApiHarness, redis: Any, row_locked: Any) -> None:
    user, sid = await _started(api)
    await row_locked.lock(sid)
    stop = asyncio.create_task(api.v1("POST", "/strategies/stop", {"strategy_id": sid}, user=user))
    await eventually(lambda: _holder(redis, sid), timeout=10, interval=0.005, message="the stop never took the lock")
    # The lock expires and another holder takes it while the stop waits for the row.
    await redis.set(keys.lock_key(sid), "executor:elsewhere:1", px=30_000)
    await asyncio.sleep(HOLD_S)  # the stop's renewal finds the lock not its own
    await row_locked.release()
    reply = await asyncio.wait_for(stop, 30)
    assert reply.status == 409 and reply.body["error"]["code"] == "strategy_busy", reply.text
    assert (await api.v1("GET", f"/strategies/{sid}", user=user, expect=200)).body["status"] == "running"
    assert await redis.exists(keys.strategy_key(sid), keys.runtime_key(sid)) == 2
    assert await _holder(redis, sid) == b"executor:elsewhere:1"  # not the stop's to release
    assert await _control_actions(redis, sid) == ["started"]


async def _pending(redis: Any, stream: str, count: int) -> bool:
    return (await redis.xpending(stream, keys.EXECUTORS_GROUP))["pending"] == count
