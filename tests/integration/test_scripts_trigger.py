"""The listener's FIRE_STOPLOSS script against a real Redis, on its edge cases (one STOPLOSS per run)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from pathlib import Path

from redis.asyncio import Redis, RedisCluster

from libs.schema import keys
from libs.schema.models import StoplossEvent, parse_event
from libs.service.redis_client import connect_redis
from libs.service.settings import ServiceSettings
from services.market_listener.index import Watch
from services.market_listener.trigger import FIRE_STOPLOSS, StoplossEmitter
from tests.support.redis_cluster import running_redis_cluster

DAY = date(2026, 3, 2)
TTL_S = 600


def _watch(run_id: str = "2026-03-02T03:00:00+00:00", sid: str | None = None) -> Watch:
    return Watch(1400.0, sid or str(uuid.uuid4()), run_id, DAY, "INFY")


async def _stoplosses(redis: Redis) -> list[StoplossEvent]:
    events = []
    for partition in range(keys.partition_count()):
        for _msg_id, fields in await redis.xrange(keys.orders_stream(partition)):
            event = parse_event(fields[b"event"])
            assert isinstance(event, StoplossEvent)
            events.append(event)
    return events


async def test_first_fire_sets_the_marker_with_its_ttl_and_queues_the_event(redis: Redis) -> None:
    script = redis.register_script(FIRE_STOPLOSS)
    marker, stream = "stoploss:fired:test:run", keys.orders_stream(0)
    msg_id = await script(keys=[marker, stream], args=[TTL_S, b'{"x": 1}'])
    assert msg_id is not None
    assert await redis.get(marker) == b"1"
    assert 0 < await redis.ttl(marker) <= TTL_S
    assert await redis.xrange(stream) == [(msg_id, {b"event": b'{"x": 1}'})]


async def test_a_marker_already_set_queues_nothing_and_keeps_its_ttl(redis: Redis) -> None:
    """Another listener fired first (or a crash after the script): no second event, the marker untouched."""
    script = redis.register_script(FIRE_STOPLOSS)
    marker, stream = "stoploss:fired:test:run", keys.orders_stream(0)
    await redis.set(marker, "1", ex=30)
    assert await script(keys=[marker, stream], args=[TTL_S, b"{}"]) is None
    assert await redis.xlen(stream) == 0
    assert await redis.ttl(marker) <= 30


async def test_an_emitted_stoploss_carries_the_run_and_the_crossing_price(redis: Redis) -> None:
    emitter = StoplossEmitter(redis, TTL_S)
    watch = _watch()
    seen_at = datetime(2026, 3, 2, 4, 0, 0, 123000, tzinfo=UTC)
    (msg_id,) = await emitter.fire([(watch, 1399.5)], seen_at)
    assert msg_id is not None
    (event,) = await _stoplosses(redis)
    assert str(event.strategy_id) == watch.strategy_id and event.run_id == watch.run_id
    assert event.trading_day == DAY and event.trigger_price == 1399.5 and event.price == 1399.5
    assert event.trigger_time == seen_at
    stream = keys.orders_stream(keys.partition_of(watch.strategy_id))
    assert [m for m, _ in await redis.xrange(stream)] == [msg_id]
    assert await redis.exists(keys.stoploss_marker_key(watch.strategy_id, watch.run_id))


async def test_a_run_fires_once_however_often_it_is_fired(redis: Redis) -> None:
    emitter = StoplossEmitter(redis, TTL_S)
    watch = _watch()
    assert (await emitter.fire([(watch, 1399.0)]))[0] is not None
    assert await emitter.fire([(watch, 1390.0)]) == [None]
    assert await emitter.fire([(watch, 1380.0), (watch, 1370.0)]) == [None, None]
    assert len(await _stoplosses(redis)) == 1


async def test_a_new_run_of_the_same_strategy_fires_again(redis: Redis) -> None:
    emitter = StoplossEmitter(redis, TTL_S)
    first = _watch("2026-03-02T03:00:00+00:00")
    second = _watch("2026-03-03T03:00:00+00:00", sid=first.strategy_id)
    assert (await emitter.fire([(first, 1399.0)]))[0] is not None
    assert (await emitter.fire([(second, 1399.0)]))[0] is not None
    assert [e.run_id for e in await _stoplosses(redis)] == [first.run_id, second.run_id]


async def test_a_batch_fires_each_run_once_even_when_it_names_one_twice(redis: Redis) -> None:
    emitter = StoplossEmitter(redis, TTL_S)
    a, b, c = _watch(), _watch(), _watch()
    results = await emitter.fire([(a, 1399.0), (b, 1398.0), (a, 1397.0), (c, 1396.0)])
    assert results[1] is not None and results[3] is not None
    assert (results[0] is None) != (results[2] is None)  # the calls run concurrently: either of a's wins
    events = await _stoplosses(redis)
    assert sorted(str(e.strategy_id) for e in events) == sorted([a.strategy_id, b.strategy_id, c.strategy_id])


async def test_fires_after_redis_lost_its_script_cache(redis: Redis) -> None:
    """A Redis restart (or SCRIPT FLUSH) empties the cache: single calls and batches reload it."""
    emitter = StoplossEmitter(redis, TTL_S)
    assert (await emitter.fire([(_watch(), 1399.0)]))[0] is not None
    await redis.script_flush()
    assert (await emitter.fire([(_watch(), 1399.0)]))[0] is not None
    await redis.script_flush()
    assert all(r is not None for r in await emitter.fire([(_watch(), 1399.0), (_watch(), 1398.0)]))
    assert len(await _stoplosses(redis)) == 4


async def test_fires_on_a_redis_cluster_before_and_after_its_script_cache_is_flushed(tmp_path: Path) -> None:
    """A batch spreads over the masters, one call per trigger, each loading the script where it was lost."""
    with running_redis_cluster(str(tmp_path)) as procs:
        settings = ServiceSettings(redis_url=procs.url, redis_cluster=True, redis_partitions=6)
        rc = connect_redis(settings)
        try:
            emitter = StoplossEmitter(rc, TTL_S)
            batch = [(_watch(), 1399.0) for _ in range(8)]  # spread over the partitions, so over the masters
            assert len({keys.partition_of(w.strategy_id) for w, _ in batch}) > 1
            assert (await emitter.fire(batch[:1]))[0] is not None
            await rc.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
            assert all(r is not None for r in await emitter.fire(batch[1:]))
            await rc.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
            assert await emitter.fire(batch[:2]) == [None, None]  # fired already: one STOPLOSS per run
            streams = {keys.orders_stream(p) for p in range(keys.partition_count())}
            assert sum([await rc.xlen(s) for s in streams]) == 8
        finally:
            keys.configure_partitions(1)
            await rc.aclose()
