"""Learn the owners of newly started runs ahead of their first event, off the order path.

The lock-and-read step returns a user's credential ciphertexts with the lock
only when the handler already knows the strategy's owner; the first event of a
run (its BUY, usually at a popular second) otherwise pays one more round trip
to read `broker:{user}` and a decrypt. The start-up reconciliation tells the
handler the owners of the runs loaded then; this watcher follows each
partition's `control:strategies` stream for `started` messages (written by
the same step that loads a run), reads the started strategies' configs in one
pipeline, hands them to the handler (parsed: the first event of the run finds
its config already parsed while the stored bytes are the same) and warms the
credential cache, so that a run's BUY costs the same round trips as any later event.

Only a hint: the handler checks the owner against the config it reads under
the lock, and a run this watcher missed (a Redis outage, a trimmed stream)
simply takes the slower path. Nothing here places or acks anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from libs.schema import keys
from libs.schema.models import StrategyConfig
from libs.service.logging import get_logger
from libs.service.redis_client import as_text
from services.executor.credentials import CredentialStore, CredentialsUnavailable

READ_COUNT = 1000


class OwnerWatch:
    """Follow `started` control messages and pre-learn each new run's owner and credentials."""

    def __init__(self, redis: Redis, credentials: CredentialStore,
                 remember: Callable[[Iterable[tuple[bytes, StrategyConfig]]], None], *, block_ms: int) -> None:
        self.redis, self.credentials, self.remember, self.block_ms = redis, credentials, remember, block_ms
        self.log = get_logger("executor.owners")
        self._last: dict[int, str] = {}
        self.learned = 0

    async def mark(self) -> None:
        """Note where each partition's control stream ends now (call before the start-up reconciliation)."""
        for partition in range(keys.partition_count()):
            with contextlib.suppress(RedisError):
                last = await self.redis.xrevrange(keys.control_stream(partition), count=1)
                self._last[partition] = as_text(last[0][0]) if last else "0-0"

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as loops:
            for partition in range(keys.partition_count()):
                loops.create_task(self._follow(stop, partition), name=f"owner-watch-{partition}")

    async def _follow(self, stop: asyncio.Event, partition: int) -> None:
        stream = keys.control_stream(partition)
        while not stop.is_set():
            try:
                reply = await self.redis.xread({stream: self._last.get(partition, "$")}, count=READ_COUNT,
                                               block=self.block_ms)
                for _stream, entries in reply or []:
                    if entries:
                        self._last[partition] = as_text(entries[-1][0])
                    await self.learn(_started_ids(entries))
            except RedisError as error:
                self.log.debug("owner watch: redis unavailable; retrying", error=str(error))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

    async def learn(self, strategy_ids: list[str]) -> None:
        """Read the configs of `strategy_ids` (one pipeline), remember their owners, warm their credentials."""
        if not strategy_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in strategy_ids:
                pipe.get(keys.strategy_key(sid))
            raws = await pipe.execute()
        parsed = []
        for raw in raws:
            if raw:
                with contextlib.suppress(ValidationError):
                    parsed.append((raw, StrategyConfig.model_validate_json(raw)))
        self.remember(parsed)
        self.learned += len(parsed)
        for user_id in {str(c.user_id) for _raw, c in parsed}:
            # Decrypted into the cache now, keyed by the ciphertexts: a reconnect before the
            # run's first event changes them and that event decrypts afresh.
            with contextlib.suppress(CredentialsUnavailable):
                await self.credentials.get(user_id)


def _started_ids(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[str]:
    ids = []
    for _id, fields in entries:
        try:
            message = orjson.loads(fields.get(b"event") or b"{}")
        except orjson.JSONDecodeError:
            continue
        if isinstance(message, dict) and message.get("action") == "started" and message.get("strategy_id"):
            ids.append(str(message["strategy_id"]))
    return ids
