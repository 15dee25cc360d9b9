"""Emit STOPLOSS events: one marker + XADD script, so a run fires once across replicas.

The script SETs `stoploss:fired:{id}:{run_id}` NX EX and XADDs the event only
if it set the marker, atomically: two listeners seeing the same tick emit one
event, and a crash cannot leave a marker without its event.

Calls go through redis-py's registered script (EVALSHA, loading the script on
NOSCRIPT). Several triggers of one tick frame run concurrently, not in a
pipeline: a standalone pipeline with a script sends SCRIPT EXISTS first (one
round trip more) and a cluster pipeline refuses EVALSHA; concurrent calls cost
one round trip and a cluster routes each by its slot.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from redis.asyncio import Redis, RedisCluster

from libs.schema import keys
from libs.schema.models import StoplossEvent, event_to_json
from services.market_listener.index import Watch

FIRE_STOPLOSS = """\
-- KEYS: [1] stoploss:fired:{id}:{run_id} (string), [2] queue:orders (stream, the strategy's partition)
-- ARGV: [1] marker TTL in seconds, [2] JSON of the STOPLOSS event
-- Returns: the new stream entry id, or false (nil) when the run had already fired
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], '*', 'event', ARGV[2])
end
return false
"""


def stoploss_json(watch: Watch, price: float, seen_at: datetime | None = None) -> bytes:
    """Return the STOPLOSS event of a watch triggered at `price` by a tick seen at `seen_at` (default now)."""
    return event_to_json(StoplossEvent(
        strategy_id=watch.strategy_id, run_id=watch.run_id, trading_day=watch.trading_day,
        trigger_price=price, price=price, trigger_time=seen_at or datetime.now(UTC)))


class StoplossEmitter:
    """Fire triggered watches, each in one round trip, a batch concurrently."""

    def __init__(self, redis: Redis | RedisCluster, marker_ttl_s: int) -> None:
        self.redis = redis
        self.marker_ttl_s = marker_ttl_s
        self._fire = redis.register_script(FIRE_STOPLOSS)

    def _call(self, watch: Watch, price: float, seen_at: datetime | None) -> tuple[list[str], list[object]]:
        # The marker and the stream are both in the strategy's partition: one hash slot.
        return ([keys.stoploss_marker_key(watch.strategy_id, watch.run_id),
                 keys.orders_stream(keys.partition_of(watch.strategy_id))],
                [self.marker_ttl_s, stoploss_json(watch, price, seen_at)])

    async def fire(self, fired: list[tuple[Watch, float]], seen_at: datetime | None = None) -> list[bytes | None]:
        """Fire each (watch, price); return the stream id per watch, None where the run had fired already."""
        calls = [self._call(watch, price, seen_at) for watch, price in fired]
        if len(calls) == 1:
            return [await self._fire(keys=calls[0][0], args=calls[0][1])]
        results = await asyncio.gather(*(self._fire(keys=k, args=a) for k, a in calls), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # once every call has ended: the caller retries them all, the markers dedupe
        return results
