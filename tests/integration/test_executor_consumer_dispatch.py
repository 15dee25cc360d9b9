"""The executor's read loop hands an entry to its handler before it asks Redis for the next ones."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from libs.schema import keys
from services.executor.consumer import OrderConsumer, ensure_group
from tests.integration.executor_support import executor_settings
from tests.support.eventually import eventually


class CountingRedis:
    """The real client, counting the XREADGROUP calls made so far (counted when issued)."""

    def __init__(self, redis: Redis) -> None:
        self.real, self.reads = redis, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
        self.reads += 1
        return await self.real.xreadgroup(*args, **kwargs)


class RecordingHandler:
    """Note how many reads had been issued when each entry's handling began; ack it."""

    def __init__(self, redis: CountingRedis) -> None:
        self.redis = redis
        self.started: list[tuple[str, int]] = []

    async def handle_entry(self, msg_id: str, fields: dict[bytes, bytes], deliveries: int,
                           partition: int = 0) -> bool:
        self.started.append((msg_id, self.redis.reads))
        await self.redis.real.xack(keys.orders_stream(partition), keys.EXECUTORS_GROUP, msg_id)
        return True


async def test_stoploss_handling_starts_before_the_next_stream_read(redis: Redis, redis_url: str) -> None:
    # A stop-loss's first round trip (its lock-read) must not queue behind the read loop's next
    # XREADGROUP: the handler's first step runs before the loop reads again.
    stream = keys.orders_stream(0)
    await ensure_group(redis, stream, keys.EXECUTORS_GROUP)
    queued = (await redis.xadd(stream, {"event": b"{}"})).decode()
    counting = CountingRedis(redis)
    handler = RecordingHandler(counting)
    settings = executor_settings(redis_url, "postgresql://unused", "http://127.0.0.1:1", read_block_ms=2000)

    async def state_lost(reason: str) -> None:
        raise AssertionError(reason)

    consumer = OrderConsumer(settings, counting, handler, "dispatch-test", state_lost)  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop))
    try:
        await eventually(lambda: handler.started, timeout=10)
        assert handler.started == [(queued, 1)]  # read 1 delivered it; read 2 not issued yet
        await eventually(lambda: counting.reads >= 2, timeout=5)
        woken = (await redis.xadd(stream, {"event": b"{}"})).decode()  # wakes the blocked read 2
        await eventually(lambda: len(handler.started) == 2, timeout=10)
        assert handler.started[1] == (woken, 2)
    finally:
        stop.set()
        await asyncio.wait_for(running, 15)
