"""Move due events from the `schedule` ZSET to `queue:orders`, exactly once.

One Lua script reads up to `batch` members with score <= now, XADDs each to
the stream and ZREMs them, in one atomic step: two schedulers can race on the
same member and only one XADD happens, because Redis runs scripts one at a time.
With N partitions the script runs once per partition, from `schedule_key(p)` to
`orders_stream(p)`: both in partition p's hash slot, so it is one step in a
Redis Cluster too, and the partitions on different masters move in parallel.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from prometheus_client import Counter, Histogram
from redis.exceptions import ResponseError

from libs.schema import keys
from libs.service.clock import Clock, SystemClock
from libs.service.redis_client import AnyRedis

_MOVE_DUE = """
-- KEYS: [1] schedule (zset), [2] queue:orders (stream)
-- ARGV: [1] now ms, [2] batch size
-- Returns: the moved members with their due scores, flat {member, score, ...} in due order
--          (empty if nothing is due; fewer than 2 * batch size: nothing more is due)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
if #due == 0 then return due end
local members = {}
for i = 1, #due, 2 do
  members[#members + 1] = due[i]
  redis.call('XADD', KEYS[2], '*', 'event', due[i])
end
redis.call('ZREM', KEYS[1], unpack(members))
return due
"""

LATENESS = Histogram(
    "scheduler_lateness_seconds", "Time from an event's due score to its XADD on queue:orders.",
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
             0.3, 0.5, 0.75, 1.0, 2.0, 5.0),
)
MOVED = Counter("scheduler_events_moved_total", "Events moved from schedule to queue:orders.", ["event_type"])


_TYPE_MARK = b'"event_type":"'


def event_type_of(member: bytes) -> str:
    """Return the event_type of a canonical event JSON without parsing it all."""
    start = member.find(_TYPE_MARK)
    if start < 0:
        return "?"
    start += len(_TYPE_MARK)
    return member[start:member.find(b'"', start)].decode()


@dataclass(frozen=True, slots=True)
class MovedEvent:
    """One event this scheduler enqueued, with how late it was."""

    member: bytes
    due_ms: int
    lateness_s: float

    @property
    def event_type(self) -> str:
        return event_type_of(self.member)


class DueMover:
    """Own the move script and the lateness bookkeeping."""

    def __init__(self, redis: AnyRedis, *, batch_size: int = 500, clock: Clock | None = None) -> None:
        self.redis = redis
        self.batch_size = batch_size
        self.clock = clock or SystemClock()
        self._move = redis.register_script(_MOVE_DUE)
        self.moved_total = 0

    async def _move_partition(self, partition: int, replies: list[tuple[list[bytes], float]]) -> None:
        while True:
            # EVALSHA; after a Redis restart (NOSCRIPT) the Script loads the source and retries.
            reply = await self._move(keys=[keys.schedule_key(partition), keys.orders_stream(partition)],
                                     args=[int(self.clock.time() * 1000), self.batch_size])
            if reply:
                replies.append((reply, self.clock.time() * 1000))
            if len(reply) < 2 * self.batch_size:
                return

    async def move_all_due(self) -> list[MovedEvent]:
        """Move every due event of every partition, batch after batch; return them.

        Bookkeeping (lateness histogram, counters) waits until every batch is
        moved, so a burst of due events reaches the streams as fast as Redis
        can take it; partitions move concurrently (each on its own master).
        """
        replies: list[tuple[list[bytes], float]] = []
        count = keys.partition_count()
        if count == 1:
            await self._move_partition(0, replies)
        else:
            await asyncio.gather(*(self._move_partition(p, replies) for p in range(count)))
        moved: list[MovedEvent] = []
        per_type: dict[str, int] = {}
        for reply, done_ms in replies:
            for i in range(0, len(reply), 2):
                due_ms = int(float(reply[i + 1]))
                event = MovedEvent(reply[i], due_ms, max(0.0, (done_ms - due_ms) / 1000))
                LATENESS.observe(event.lateness_s)
                kind = event.event_type
                per_type[kind] = per_type.get(kind, 0) + 1
                moved.append(event)
        for kind, count in per_type.items():
            MOVED.labels(kind).inc(count)
        self.moved_total += len(moved)
        return moved

    async def seconds_until_next_due(self) -> float | None:
        """Return how long until the earliest member of any partition is due, or None if all are empty."""
        count = keys.partition_count()
        if count == 1:
            heads = [await self.redis.zrange(keys.SCHEDULE, 0, 0, withscores=True)]
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for p in range(count):
                    pipe.zrange(keys.schedule_key(p), 0, 0, withscores=True)
                heads = await pipe.execute()
        firsts = [head[0][1] for head in heads if head]
        if not firsts:
            return None
        return max(0.0, min(firsts) / 1000 - self.clock.time())


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def trim_acked_orders(redis: AnyRedis) -> int:
    """Trim every partition's `queue:orders` (see trim_acked_stream); return how many entries went."""
    trimmed = 0
    for partition in range(keys.partition_count()):
        trimmed += await trim_acked_stream(redis, keys.orders_stream(partition))
    return trimmed


async def trim_acked_stream(redis: AnyRedis, stream: str) -> int:
    """Delete `queue:orders` entries every consumer group has delivered and acked; return how many.

    Nothing else trims the stream (executors only ack), so it would grow by every event
    ever scheduled until Redis ran out of memory. A MAXLEN on XADD could cut entries still
    waiting for an executor; this keeps everything from the oldest pending entry (or, with
    none pending, from the last delivered one) on. With no group yet, nothing is trimmed:
    the executors' group starts at 0 and must still see every entry.
    """
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return 0  # no stream yet
    if not groups:
        return 0
    floor: tuple[int, int] | None = None
    for group in groups:
        name = group["name"]
        bound = _stream_id(group["last-delivered-id"])
        if group["pending"]:
            summary = await redis.xpending(stream, name)
            if summary.get("min"):
                bound = min(bound, _stream_id(summary["min"]))
        floor = bound if floor is None else min(floor, bound)
    if floor is None or floor == (0, 0):
        return 0
    return int(await redis.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False))
