"""Consume `queue:orders` in group `executors`: read, claim, bound, drain.

New entries come from XREADGROUP (`>`), at most `max_in_flight` at a time.
Liveness decides when another consumer's entries are taken over: each
consumer renews a heartbeat key (`executor:alive:{name}`, PX heartbeat_ttl_ms)
every third of its TTL, and the entries of a consumer whose heartbeat is gone
are claimed at once (XCLAIM), so a kill -9 delays its events by seconds, not
by the idle timeout. Entries idle longer than `claim_idle_ms` are still taken
over with XAUTOCLAIM whoever holds them (a live consumer keeps its in-flight
entries' idle time at zero). Delivery counts come from XPENDING, so an entry
that keeps failing ends in the dead-letter stream. A handler error leaves the
entry pending (never acked), so it is retried by a later claim.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from libs.schema import keys
from libs.service.logging import get_logger
from services.executor import metrics
from services.executor.handler import OrderHandler
from services.executor.settings import ExecutorSettings
from services.executor.state import LockLost, LockTimeout

DEAD_CLAIM_MIN_IDLE_MS = 200


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) unless it exists."""
    try:
        # From 0, not $: events queued while no executor ran must still be handled.
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def is_nogroup(error: BaseException) -> bool:
    return isinstance(error, ResponseError) and "NOGROUP" in str(error)


class OrderConsumer:
    """Feed stream entries to the handler with bounded concurrency."""

    def __init__(self, settings: ExecutorSettings, redis: Redis, handler: OrderHandler, name: str,
                 on_state_lost: Callable[[str], Awaitable[None]]) -> None:
        self.settings, self.redis, self.handler, self.name = settings, redis, handler, name
        self.on_state_lost = on_state_lost
        self.log = get_logger("executor.consumer", consumer=name)
        self.resume = asyncio.Event()
        self.resume.set()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Read and handle entries until `stop`; then drain within the grace period."""
        with contextlib.suppress(RedisError):
            await self._beat()  # alive before the first read: no one takes what it reads as a dead one's
        claimer = asyncio.create_task(self._claim_loop(stop), name="orders-claimer")
        try:
            while not stop.is_set():
                if not self.resume.is_set():
                    await _wait_any(self.resume.wait(), stop.wait())
                    continue
                free = self.settings.max_in_flight - len(self._inflight)
                if free <= 0:
                    self._slot_freed.clear()
                    await _wait_any(self._slot_freed.wait(), stop.wait())
                    continue
                try:
                    reply = await self.redis.xreadgroup(keys.EXECUTORS_GROUP, self.name, {keys.ORDERS_STREAM: ">"},
                                                        count=free, block=self.settings.read_block_ms)
                except ResponseError as error:
                    if is_nogroup(error) or "no longer exists" in str(error):
                        await self.on_state_lost("consumer group missing")
                    else:
                        self.log.error("redis refused XREADGROUP; retrying", error=str(error))
                        await _sleep_unless(stop, 0.5)
                    continue
                except (RedisConnectionError, RedisTimeoutError) as error:
                    self.log.warning("redis unavailable; retrying", error=str(error))
                    await _sleep_unless(stop, 0.5)
                    continue
                for _stream, entries in reply or []:
                    for msg_id, fields in entries:
                        self._start(_text(msg_id), fields, 1)
        finally:
            await self._drain()
            claimer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claimer
            with contextlib.suppress(RedisError):
                # Whatever is still pending here (cancelled after the grace period) is
                # claimed by the others right away.
                await self.redis.delete(keys.consumer_alive_key(self.name))

    def _start(self, msg_id: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        if msg_id in self._inflight:
            return
        self._inflight[msg_id] = asyncio.create_task(self._handle(msg_id, fields, deliveries), name=f"order-{msg_id}")
        metrics.IN_FLIGHT.set(len(self._inflight))

    async def _handle(self, msg_id: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        try:
            await self.handler.handle_entry(msg_id, fields, deliveries)
        except LockTimeout as error:
            self.log.warning("strategy lock busy; entry left pending", msg_id=msg_id, error=str(error))
        except LockLost as error:
            # Nothing was sent after the loss; the entry is redelivered and the tag lookup decides.
            self.log.error("strategy lock lost mid-event; entry left pending", msg_id=msg_id, error=str(error))
        except RedisError as error:
            self.log.error("redis failed mid-event; entry left pending", msg_id=msg_id, error=str(error))
        except Exception:  # noqa: BLE001 - one bad event must not stop the consumer; it stays pending
            self.log.exception("event handling crashed; entry left pending", msg_id=msg_id)
        finally:
            self._inflight.pop(msg_id, None)
            metrics.IN_FLIGHT.set(len(self._inflight))
            self._slot_freed.set()

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        heartbeat_s = self.settings.heartbeat_ttl_ms / 3000
        next_claim = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await self._beat()
                if self.resume.is_set():
                    await self.claim_from_dead()
                    if loop.time() >= next_claim:
                        next_claim = loop.time() + self.settings.claim_interval_s
                        await self._touch_inflight()
                        await self.claim_abandoned()
            except ResponseError as error:
                if not is_nogroup(error):
                    self.log.error("claim failed", error=str(error))
            except RedisError as error:
                self.log.warning("claim failed; redis unavailable", error=str(error))
            await _sleep_unless(stop, min(heartbeat_s, self.settings.claim_interval_s))

    async def _beat(self) -> None:
        await self.redis.set(keys.consumer_alive_key(self.name), "1", px=self.settings.heartbeat_ttl_ms)

    async def claim_from_dead(self) -> int:
        """Take over every entry held by a consumer whose heartbeat is gone; return how many were started.

        Costs one XINFO CONSUMERS per heartbeat period, plus an EXISTS per consumer
        holding entries; nothing on the per-order path.
        """
        free = self.settings.max_in_flight - len(self._inflight)
        if free <= 0:
            return 0
        holders = [c for c in await self.redis.xinfo_consumers(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
                   if int(c["pending"]) > 0 and _text(c["name"]) != self.name]
        if not holders:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for consumer in holders:
                pipe.exists(keys.consumer_alive_key(_text(consumer["name"])))
            alive = await pipe.execute()
        started = 0
        for consumer, is_alive in zip(holders, alive, strict=True):
            if is_alive or free - started <= 0:
                continue
            dead = _text(consumer["name"])
            pending = await self.redis.xpending_range(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, min="-", max="+",
                                                      count=free - started, consumername=dead)
            ids = [_text(p["message_id"]) for p in pending]
            if not ids:
                continue
            # min idle: not an entry the (dead) holder was handed this very instant by a read
            # still in flight; XCLAIM only moves entries still pending under the group.
            claimed = await self.redis.xclaim(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, self.name,
                                              DEAD_CLAIM_MIN_IDLE_MS, ids)
            entries = [(_text(i), f) for i, f in claimed if f is not None]
            if not entries:
                continue
            counts = await self._delivery_counts(sorted((i for i, _ in entries), key=_stream_order))
            for msg_id, fields in entries:
                self.log.warning("claimed entry of a dead consumer", msg_id=msg_id, dead_consumer=dead,
                                 deliveries=counts.get(msg_id, 2))
                self._start(msg_id, fields, counts.get(msg_id, 2))
                started += 1
        return started

    async def _touch_inflight(self) -> None:
        # An event waiting on its lock or the rate limit is not abandoned: reset
        # its idle time (JUSTID does not count a delivery) so that no claimer,
        # this one included, takes it and inflates its delivery count.
        ids = list(self._inflight)
        if ids:
            await self.redis.xclaim(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, self.name, 0, ids, justid=True)

    async def claim_abandoned(self) -> int:
        """Take over entries pending too long elsewhere; return how many were started."""
        started, cursor = 0, "0-0"
        while True:
            free = self.settings.max_in_flight - len(self._inflight)
            if free <= 0:
                return started
            reply: Any = await self.redis.xautoclaim(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, self.name,
                                                     min_idle_time=self.settings.claim_idle_ms,
                                                     start_id=cursor, count=free)
            cursor, entries = _text(reply[0]), [(_text(i), f) for i, f in reply[1] if f is not None]
            if entries:
                counts = await self._delivery_counts([i for i, _ in entries])
                for msg_id, fields in entries:
                    self.log.warning("claimed abandoned entry", msg_id=msg_id, deliveries=counts.get(msg_id, 2))
                    self._start(msg_id, fields, counts.get(msg_id, 2))
                    started += 1
            if cursor == "0-0" or not entries:
                return started

    async def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        pending = await self.redis.xpending_range(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, min=ids[0],
                                                  max=ids[-1], count=len(ids) * 4 + 10, consumername=self.name)
        return {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}

    async def _drain(self) -> None:
        if not self._inflight:
            return
        tasks = list(self._inflight.values())
        self.log.info("draining in-flight events", count=len(tasks))
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
        for task in pending:
            task.cancel()
        if pending:
            self.log.warning("cancelled events still in flight after the grace period; they stay pending",
                             count=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Wait until no event is in flight (used before reconciling)."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)


async def _wait_any(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _stream_order(msg_id: str) -> tuple[int, int]:
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
