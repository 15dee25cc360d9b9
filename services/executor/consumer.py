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

With N partitions (docs/cluster.md) there is one `queue:orders` stream and one
group per partition; this consumer reads every partition's stream with its own
XREADGROUP (a cluster cannot read streams of several slots in one call) under
one shared in-flight bound, so replicas share every partition's work and any
replica takes over any dead one's entries.
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
from libs.service.lifecycle import sleep_unless_stopped
from libs.service.logging import get_logger
from libs.service.redis_client import as_text
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
        # In-flight entries by (partition, msg id): ids are unique per stream only.
        self._inflight: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._reading = 0  # slots promised to reads still in flight (one per partition at most)
        self._slot_freed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Read and handle entries until `stop`; then drain within the grace period."""
        with contextlib.suppress(RedisError):
            await self._beat()  # alive before the first read: no one takes what it reads as a dead one's
        claimer = asyncio.create_task(self._claim_loop(stop), name="orders-claimer")
        try:
            async with asyncio.TaskGroup() as readers:
                for partition in range(keys.partition_count()):
                    readers.create_task(self._read_loop(stop, partition), name=f"orders-reader-{partition}")
        finally:
            await self._drain()
            claimer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claimer
            with contextlib.suppress(RedisError):
                # Whatever is still pending here (cancelled after the grace period) is
                # claimed by the others right away.
                await self.redis.delete(keys.consumer_alive_key(self.name))

    async def _read_loop(self, stop: asyncio.Event, partition: int) -> None:
        stream = keys.orders_stream(partition)
        # The partitions' readers share the in-flight bound: a blocked read holds its count
        # until its entries start, and asks for at most its share, so that every partition's
        # reader can block at once (with one partition: the whole bound, as ever).
        share = max(1, self.settings.max_in_flight // keys.partition_count())
        while not stop.is_set():
            if not self.resume.is_set():
                await _wait_any(self.resume.wait(), stop.wait())
                continue
            free = min(share, self.settings.max_in_flight - len(self._inflight) - self._reading)
            if free <= 0:
                self._slot_freed.clear()
                await _wait_any(self._slot_freed.wait(), stop.wait())
                continue
            self._reading += free
            try:
                reply = await self.redis.xreadgroup(keys.EXECUTORS_GROUP, self.name, {stream: ">"},
                                                    count=free, block=self.settings.read_block_ms)
            except ResponseError as error:
                if is_nogroup(error) or "no longer exists" in str(error):
                    await self.on_state_lost("consumer group missing")
                else:
                    self.log.error("redis refused XREADGROUP; retrying", error=str(error))
                    await sleep_unless_stopped(stop, 0.5)
                continue
            except (RedisConnectionError, RedisTimeoutError) as error:
                self.log.warning("redis unavailable; retrying", error=str(error))
                await sleep_unless_stopped(stop, 0.5)
                continue
            finally:
                self._reading -= free
                self._slot_freed.set()  # another partition's reader may now have room
            started = False
            for _stream, entries in reply or []:
                for msg_id, fields in entries:
                    self._start(as_text(msg_id), fields, 1, partition)
                    started = True
            if started:
                # Let the new handlers run up to their first round trip (a stop-loss's lock-read
                # leaves now) before this loop builds and sends its next XREADGROUP.
                await asyncio.sleep(0)

    def _start(self, msg_id: str, fields: dict[bytes, bytes], deliveries: int, partition: int = 0) -> None:
        if (partition, msg_id) in self._inflight:
            return
        self._inflight[(partition, msg_id)] = asyncio.create_task(
            self._handle(msg_id, fields, deliveries, partition), name=f"order-{partition}-{msg_id}")
        metrics.IN_FLIGHT.set(len(self._inflight))

    async def _handle(self, msg_id: str, fields: dict[bytes, bytes], deliveries: int, partition: int = 0) -> None:
        try:
            await self.handler.handle_entry(msg_id, fields, deliveries, partition=partition)
        except LockTimeout as error:
            self.log.warning("strategy lock busy; entry left pending", msg_id=msg_id, error=str(error))
        except LockLost as error:
            # Nothing was sent after the loss; the entry is redelivered and the tag lookup decides.
            self.log.error("strategy lock lost mid-event; entry left pending", msg_id=msg_id, error=str(error))
        except RedisError as error:
            self.log.error("redis failed mid-event; entry left pending", msg_id=msg_id, error=str(error))
        except Exception:  # one bad event must not stop the consumer; it stays pending
            self.log.exception("event handling crashed; entry left pending", msg_id=msg_id)
        finally:
            self._inflight.pop((partition, msg_id), None)
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
            await sleep_unless_stopped(stop, min(heartbeat_s, self.settings.claim_interval_s))

    async def _beat(self) -> None:
        await self.redis.set(keys.consumer_alive_key(self.name), "1", px=self.settings.heartbeat_ttl_ms)

    async def claim_from_dead(self) -> int:
        """Take over every entry held by a consumer whose heartbeat is gone, in every partition.

        Costs one XINFO CONSUMERS per partition per heartbeat period, plus an EXISTS
        per consumer holding entries; nothing on the per-order path.
        """
        started = 0
        for partition in range(keys.partition_count()):
            started += await self._claim_dead_in(partition)
        return started

    async def _claim_dead_in(self, partition: int) -> int:
        stream = keys.orders_stream(partition)
        free = self.settings.max_in_flight - len(self._inflight)
        if free <= 0:
            return 0
        holders = [c for c in await self.redis.xinfo_consumers(stream, keys.EXECUTORS_GROUP)
                   if int(c["pending"]) > 0 and as_text(c["name"]) != self.name]
        if not holders:
            return 0
        alive = [await self.redis.exists(keys.consumer_alive_key(as_text(c["name"]))) for c in holders]
        started = 0
        for consumer, is_alive in zip(holders, alive, strict=True):
            if is_alive or free - started <= 0:
                continue
            dead = as_text(consumer["name"])
            pending = await self.redis.xpending_range(stream, keys.EXECUTORS_GROUP, min="-", max="+",
                                                      count=free - started, consumername=dead)
            ids = [as_text(p["message_id"]) for p in pending]
            if not ids:
                continue
            # min idle: not an entry the (dead) holder was handed this very instant by a read
            # still in flight; XCLAIM only moves entries still pending under the group.
            claimed = await self.redis.xclaim(stream, keys.EXECUTORS_GROUP, self.name, DEAD_CLAIM_MIN_IDLE_MS, ids)
            entries = [(as_text(i), f) for i, f in claimed if f is not None]
            if not entries:
                continue
            counts = await self._delivery_counts(stream, sorted((i for i, _ in entries), key=_stream_order))
            for msg_id, fields in entries:
                self.log.warning("claimed entry of a dead consumer", msg_id=msg_id, dead_consumer=dead,
                                 deliveries=counts.get(msg_id, 2))
                self._start(msg_id, fields, counts.get(msg_id, 2), partition)
                started += 1
        return started

    async def _touch_inflight(self) -> None:
        # An event waiting on its lock or the rate limit is not abandoned: reset
        # its idle time (JUSTID does not count a delivery) so that no claimer,
        # this one included, takes it and inflates its delivery count.
        by_partition: dict[int, list[str]] = {}
        for partition, msg_id in self._inflight:
            by_partition.setdefault(partition, []).append(msg_id)
        for partition, ids in by_partition.items():
            await self.redis.xclaim(keys.orders_stream(partition), keys.EXECUTORS_GROUP, self.name, 0, ids,
                                    justid=True)

    async def claim_abandoned(self) -> int:
        """Take over entries pending too long elsewhere, in every partition; return how many were started."""
        started = 0
        for partition in range(keys.partition_count()):
            started += await self._claim_partition(partition)
        return started

    async def _claim_partition(self, partition: int) -> int:
        stream = keys.orders_stream(partition)
        started, cursor = 0, "0-0"
        while True:
            free = self.settings.max_in_flight - len(self._inflight)
            if free <= 0:
                return started
            reply: Any = await self.redis.xautoclaim(stream, keys.EXECUTORS_GROUP, self.name,
                                                     min_idle_time=self.settings.claim_idle_ms,
                                                     start_id=cursor, count=free)
            cursor, entries = as_text(reply[0]), [(as_text(i), f) for i, f in reply[1] if f is not None]
            if entries:
                counts = await self._delivery_counts(stream, [i for i, _ in entries])
                for msg_id, fields in entries:
                    self.log.warning("claimed abandoned entry", msg_id=msg_id, deliveries=counts.get(msg_id, 2))
                    self._start(msg_id, fields, counts.get(msg_id, 2), partition)
                    started += 1
            if cursor == "0-0" or not entries:
                return started

    async def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        pending = await self.redis.xpending_range(stream, keys.EXECUTORS_GROUP, min=ids[0],
                                                  max=ids[-1], count=len(ids) * 4 + 10, consumername=self.name)
        return {as_text(p["message_id"]): int(p["times_delivered"]) for p in pending}

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


def _stream_order(msg_id: str) -> tuple[int, int]:
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq or 0)
