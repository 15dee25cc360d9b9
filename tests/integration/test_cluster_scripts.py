"""Every Lua script and MULTI of the product runs on a real 3-master Redis Cluster with 6 partitions.

A script or transaction naming keys of two hash slots fails there with
CROSSSLOT, so each call below fails if its keys drift apart. The strategies
are picked so that both cases occur: a user (credentials, rate-limit key) in
the strategy's partition, and one in another partition (the fused steps fall
back to separate calls). Results are checked too, so a call cannot pass by
doing nothing.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import RedisCluster

from libs.schema import keys
from libs.schema.codec import dumps, loads
from libs.schema.models import (
    AbortEvent,
    OrderLogRow,
    Position,
    RetryEvent,
    StrategyConfig,
    event_to_json,
    order_log_id,
)
from libs.service.redis_client import connect_redis, server_run_id
from libs.service.settings import ServiceSettings
from libs.trading.calendar import MarketCalendar
from libs.trading.lock import StrategyLocks
from libs.trading.runs import load_run, plan_run, run_id_for, schedule_event, unload_run
from libs.trading.tags import order_tag
from services.api.run_control import _load_ended_square_off, _square_off
from services.api.security import LoginThrottle
from services.executor.log_writer import OrderLogWriter
from services.executor.ratelimit import OrderRateLimiter
from services.executor.reconcile import Reconciler
from services.executor.state import OrderState
from services.market_listener.index import Watch
from services.market_listener.trigger import StoplossEmitter
from services.scheduler.mover import DueMover, trim_acked_orders
from tests.support.redis_cluster import RedisClusterProcs, running_redis_cluster

PARTITIONS = 6
CAL = MarketCalendar("always_open")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcs]:
    with tempfile.TemporaryDirectory(prefix="tw-cluster-") as tmp, running_redis_cluster(tmp) as procs:
        yield procs


@pytest.fixture
async def rc(cluster: RedisClusterProcs) -> AsyncIterator[RedisCluster]:
    settings = ServiceSettings(redis_url=cluster.url, redis_cluster=True, redis_partitions=PARTITIONS)
    client = connect_redis(settings)
    assert isinstance(client, RedisCluster)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    try:
        yield client
    finally:
        keys.configure_partitions(1)
        await client.aclose()


def _ids(same_partition: bool) -> tuple[uuid.UUID, uuid.UUID]:
    """Return (strategy id, user id) whose partitions agree or differ as asked.

    Never partition 0: the module constants name it, so a call site still using
    one (keys.ORDERS_STREAM for a strategy's stream) would go unnoticed there.
    """
    while True:
        sid, uid = uuid.uuid4(), uuid.uuid4()
        if keys.partition_of(sid) != 0 and (keys.partition_of(sid) == keys.partition_of(uid)) == same_partition:
            return sid, uid


def _config(sid: uuid.UUID, uid: uuid.UUID, fp: str) -> StrategyConfig:
    return StrategyConfig(strategy_id=sid, user_id=uid, symbol="INFY", buy_time="09:30:00", sell_time="15:00:00",
                          stop_loss=1500.0, quantity=1, status="running", run_id=run_id_for(datetime.now(UTC)),
                          api_key_fp=fp)


@pytest.mark.parametrize("same_partition", [True, False])
async def test_every_script_runs_on_a_cluster(rc: RedisCluster, same_partition: bool) -> None:
    assert keys.partition_count() == PARTITIONS
    sid, uid = _ids(same_partition)
    fp = str(uid).replace("-", "")[:16]  # the account's partition is the user's or another
    part = keys.partition_of(sid)
    config = _config(sid, uid, fp)
    plan = plan_run(config, CAL, datetime.fromisoformat(config.run_id))

    # Run load (config, runtime, index, schedule, control) and a RETRY in the schedule.
    await load_run(rc, config, plan)
    assert await rc.sismember(keys.symbol_strategies_key("INFY", part), str(sid))
    retry = RetryEvent(strategy_id=sid, run_id=config.run_id, trading_day=plan.trading_day, attempt=2,
                       retry_of="BUY")
    await schedule_event(rc, retry, 1)
    await rc.hset(keys.broker_credentials_key(uid), mapping={"api_key": "ct", "api_key_fp": fp, "is_valid": "1"})

    # The scheduler: move what is due (the RETRY) into the partition's stream; trim.
    mover = DueMover(rc)
    moved = await mover.move_all_due()
    assert [m.event_type for m in moved] == ["RETRY"]
    assert await mover.seconds_until_next_due() is not None
    entries = await rc.xrange(keys.orders_stream(part))
    assert len(entries) == 1
    await rc.xgroup_create(keys.orders_stream(part), keys.EXECUTORS_GROUP, id="0", mkstream=True)
    read = await rc.xreadgroup(keys.EXECUTORS_GROUP, "c1", {keys.orders_stream(part): ">"}, count=10)
    msg_id = read[0][1][0][0].decode()

    # The executor: lock and read (with credentials and an exit slot), commit with ack and release.
    state = OrderState(rc, lock_ttl_ms=5000, lock_wait_s=2)
    limiter = OrderRateLimiter(rc, limit=10, window_ms=1100, max_wait_s=2)
    exit_slot = (fp, *limiter.slot_request(fp))
    async with state.locked_read(str(sid), config.run_id, str(uid), exit_slot, 60) as held:
        assert held.raw_config is not None and held.runtime[b"position"] == b"none"
        assert (held.credentials is not None) == same_partition
        row = OrderLogRow(id=order_log_id(keys.orders_stream(part), msg_id), strategy_id=sid, user_id=uid,
                          event_type="RETRY", request_payload={}, response_payload={}, status="skipped",
                          trading_day=plan.trading_day, stream_msg_id=msg_id, created_at=datetime.now(UTC),
                          run_id=config.run_id)
        await state.commit(strategy_id=str(sid), run_id=config.run_id, row=dumps(row),
                           runtime_fields={"position": Position.bought.value},
                           control=dumps({"action": "position", "strategy_id": str(sid), "position": "bought"}),
                           abort_event=None, ack_msg_id=msg_id, held=held)
    assert held.released
    assert await rc.xpending(keys.orders_stream(part), keys.EXECUTORS_GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []}
    assert len(await rc.xrange(keys.order_logs_stream(part))) == 1

    # A rate slot with the exit marker (one script, or slot then SET across slots).
    marker = keys.exit_attempt_key(sid, config.run_id)
    await rc.delete(marker)
    await limiter.acquire(fp, mark=(marker, 60))
    assert await rc.exists(marker)

    # The listener's fire: marker + XADD, single and batched.
    emitter = StoplossEmitter(rc, marker_ttl_s=60)
    watch = Watch(1500.0, str(sid), config.run_id, plan.trading_day, "INFY")
    other_sid, other_uid = _ids(same_partition)
    other = _config(other_sid, other_uid, fp)
    await load_run(rc, other, plan_run(other, CAL, datetime.fromisoformat(other.run_id)))
    other_watch = Watch(1500.0, str(other_sid), other.run_id, plan.trading_day, "INFY")
    assert (await emitter.fire([(watch, 1499.0)]))[0] is not None
    fired = await emitter.fire([(watch, 1498.0), (other_watch, 1498.0)])
    assert fired[0] is None and fired[1] is not None  # one STOPLOSS per run

    # Dead letter with the ABORT of the loaded run, in one step.
    await rc.xadd(keys.orders_stream(part), {"event": b"junk"})
    read = await rc.xreadgroup(keys.EXECUTORS_GROUP, "c1", {keys.orders_stream(part): ">"}, count=10)
    junk_id = read[0][1][-1][0].decode()
    abort = AbortEvent(strategy_id=sid, run_id=config.run_id, trading_day=plan.trading_day, reason="test")
    assert await state.dead_letter(junk_id, b"junk", "test", 4, (str(sid), config.run_id, event_to_json(abort)),
                                   partition=part)
    assert len(await rc.xrange(keys.orders_dead_stream(part))) == 1

    # Reconciliation from the broker: runtime + control, then row + control.
    reconciler = Reconciler(rc, None, None, None, state, CAL, pg_timeout_s=1)
    entry = {"order_id": "1", "status": "COMPLETE", "average_price": 1500.0, "quantity": config.quantity,
             "filled_quantity": config.quantity, "tag": order_tag(sid, config.run_id, plan.trading_day, "entry")}
    await rc.hset(keys.runtime_key(sid), "position", Position.none.value)
    assert await reconciler._strategy(config, {entry["tag"]: [entry]}) == 1
    exit_ = {**entry, "order_id": "2", "tag": order_tag(sid, config.run_id, plan.trading_day, "exit")}
    assert await reconciler._strategy(config, {entry["tag"]: [entry], exit_["tag"]: [exit_]}) == 1

    # The order-log writer's dead letter (MULTI of the row stream and its dead stream).
    writer = OrderLogWriter(rc, None, "w1", batch=10, block_ms=10, claim_idle_ms=1000,  # type: ignore[arg-type]
                            backoff_max_s=0.1)
    await writer._dead("1-0", b"bad", "test", part)
    assert len(await rc.xrange(keys.order_logs_dead_stream(part))) == 1

    # The API: square-off (unschedule, unwatch, queue the SELL) and the login throttle MULTI.
    await load_run(rc, config, plan)
    await rc.hset(keys.runtime_key(sid), "position", Position.bought.value)
    assert await _square_off(rc, config, plan, datetime.now(UTC)) is True
    (_, last), = await rc.xrevrange(keys.orders_stream(part), count=1)
    assert loads(last[b"event"])["event_type"] == "SELL"
    throttle = LoginThrottle(rc, max_failures=5, window_s=60)  # type: ignore[arg-type]
    await throttle.reserve("a@example.com", "10.0.0.1")

    # Unload, and the scheduler's bookkeeping across partitions.
    assert await unload_run(rc, config, plan) is True  # a square-off keeps the run loaded until the exit
    assert await trim_acked_orders(rc) >= 0
    assert "," in await server_run_id(rc)  # one run_id per primary


async def test_strategy_lock_and_an_ended_runs_square_off_on_a_cluster(rc: RedisCluster) -> None:
    sid, uid = _ids(True)
    config = _config(sid, uid, "fp")
    plan = plan_run(config, CAL, datetime.fromisoformat(config.run_id))
    await load_run(rc, config, plan)
    lock, runtime = keys.lock_key(sid), keys.runtime_key(sid)
    locks = StrategyLocks(rc, role="api", ttl_ms=300, wait_s=2)
    async with locks.hold(str(sid)) as lease:
        assert await rc.hget(runtime, "lock_state") == b"locked"
        await asyncio.sleep(1)  # several TTLs: kept by renewal
        lease.ensure_held()
        assert await rc.get(lock) == lease.token.encode()
    assert not await rc.exists(lock) and await rc.hget(runtime, "lock_state") == b"free"
    await unload_run(rc, config, plan)
    assert await _load_ended_square_off(rc, config, plan, "1", datetime.now(UTC))
    assert not await _load_ended_square_off(rc, config, plan, "1", datetime.now(UTC))  # one exit only
    (_, last), = await rc.xrevrange(keys.orders_stream(keys.partition_of(sid)), count=1)
    assert loads(last[b"event"])["metadata"] == {"square_off": True}


async def test_scripts_reload_after_the_primaries_lost_their_script_cache(rc: RedisCluster) -> None:
    # A restart or failover empties a primary's script cache: each Script gets NOSCRIPT,
    # loads its source on every primary and runs again, routed by its keys' slot.
    sid, uid = _ids(False)
    fp = str(uid).replace("-", "")[:16]
    config = _config(sid, uid, fp)
    plan = plan_run(config, CAL, datetime.fromisoformat(config.run_id))
    mover = DueMover(rc)
    limiter = OrderRateLimiter(rc, limit=10, window_ms=1100, max_wait_s=2)
    for _ in range(2):
        await rc.script_flush()  # on every primary
        assert await rc.script_exists(mover._move.sha) == [False]
        await load_run(rc, config, plan)
        assert await unload_run(rc, config, plan) is True
        await schedule_event(rc, plan.sell, 1)
        assert [m.event_type for m in await mover.move_all_due()] == ["SELL"]
        await limiter.acquire(fp, mark=(keys.exit_attempt_key(sid, config.run_id), 60))
    assert len(await rc.xrange(keys.orders_stream(keys.partition_of(sid)))) == 2
