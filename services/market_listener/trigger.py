"""Emit STOPLOSS events: one marker + XADD script, so a run fires once across replicas.

The script SETs `stoploss:fired:{id}:{run_id}` NX EX and XADDs the event only
if it set the marker, atomically: two listeners seeing the same tick emit one
event, and a crash cannot leave a marker without its event.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from libs.schema import keys
from libs.schema.models import StoplossEvent, event_to_json
from services.market_listener.index import Watch

_FIRE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], '*', 'event', ARGV[2])
end
return false
"""


def stoploss_json(watch: Watch, price: float) -> bytes:
    """Return the STOPLOSS event of a watch triggered at `price`."""
    return event_to_json(StoplossEvent(
        strategy_id=watch.strategy_id, run_id=watch.run_id, trading_day=watch.trading_day,
        trigger_price=price, price=price, trigger_time=datetime.now(UTC)))


class StoplossEmitter:
    """Fire triggered watches, many per Redis round trip."""

    def __init__(self, redis: Redis, marker_ttl_s: int) -> None:
        self.redis = redis
        self.marker_ttl_s = marker_ttl_s
        self.sha: str | None = None

    async def load(self) -> None:
        self.sha = await self.redis.script_load(_FIRE)

    def _args(self, watch: Watch, price: float) -> tuple[object, ...]:
        # The marker and the stream are both in the strategy's partition: one hash slot.
        return (2, keys.stoploss_marker_key(watch.strategy_id, watch.run_id),
                keys.orders_stream(keys.partition_of(watch.strategy_id)),
                self.marker_ttl_s, stoploss_json(watch, price))

    async def fire(self, fired: list[tuple[Watch, float]]) -> list[bytes | None]:
        """Fire each (watch, price); return the stream id per watch, None where a marker existed."""
        if self.sha is None:
            await self.load()
        args = [self._args(watch, price) for watch, price in fired]
        if len(args) == 1:
            try:
                return [await self.redis.evalsha(self.sha, *args[0])]
            except NoScriptError:
                await self.load()
                return [await self.redis.evalsha(self.sha, *args[0])]
        if isinstance(self.redis, RedisCluster):
            # A cluster pipeline cannot carry scripts: one concurrent call each, routed by slot.
            return list(await asyncio.gather(*(self.redis.eval(_FIRE, *a) for a in args)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for a in args:
                pipe.evalsha(self.sha, *a)
            results = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if isinstance(result, NoScriptError):
                # Redis restarted and lost the script cache: EVAL carries the script itself.
                results[i] = await self.redis.eval(_FIRE, *args[i])
            elif isinstance(result, Exception):
                raise result
        return results
