"""The trading day against a real 3-master Redis Cluster with 6 partitions, through real processes.

The same local stack as the other e2e tests (`deploy.local`), with every
service pointed at a cluster started from redis-server (`--cluster-enabled
yes`, `redis-cli --cluster create`): TICKWISE_REDIS_URL names one node,
TICKWISE_REDIS_CLUSTER=true, TICKWISE_REDIS_PARTITIONS=6 (two partitions per
master). Any script or MULTI spanning two hash slots would fail with CROSSSLOT
here; the tests check orders reach the broker exactly once, with strategies
spread over partitions on every master.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
import redis

from libs.schema import keys
from tests.e2e.harness import Stack, Trader, running_stack
from tests.support.eventually import eventually
from tests.support.redis_cluster import RedisClusterProcs, running_redis_cluster

PARTITIONS = 6


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcs]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tw-cluster-") as tmp, running_redis_cluster(tmp, replicas=1) as procs:
        yield procs


@pytest.fixture(scope="module")
def cluster_stack(cluster: RedisClusterProcs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # TICKWISE_REDIS_URL wins over the stack's own REDIS_URL (settings read it first):
    # every service talks to the cluster; the stack's standalone Redis idles.
    env = {"TICKWISE_REDIS_URL": cluster.url, "TICKWISE_REDIS_CLUSTER": "true",
           "TICKWISE_REDIS_PARTITIONS": str(PARTITIONS)}
    with running_stack(tmp_path_factory.mktemp("e2e-cluster-stack"), env, replicas=("executor",)) as stack:
        yield stack


@pytest.fixture
def partitions() -> Iterator[int]:
    keys.configure_partitions(PARTITIONS)  # this process names keys as the services do
    try:
        yield PARTITIONS
    finally:
        keys.configure_partitions(1)


async def test_trading_day_on_a_redis_cluster_places_each_order_once(
        cluster: RedisClusterProcs, cluster_stack: Stack, http: aiohttp.ClientSession, partitions: int) -> None:
    traders = [await Trader(http, cluster_stack).sign_up() for _ in range(2)]
    await traders[0].tick("INFY", 1500)
    await traders[0].tick("RELIANCE", 2500)
    # Stop-loss strategies: bought, then one falling tick sends exactly one SELL each.
    sl = [await traders[i % 2].strategy("RELIANCE", buy_in_s=3, sell_in_s=90, stop_loss=2450 - i, quantity=1)
          for i in range(6)]
    # Time-exit strategies: BUY then SELL by the schedule.
    timed = [await traders[i % 2].strategy("INFY", buy_in_s=3, sell_in_s=7, stop_loss=1400, quantity=2)
             for i in range(4)]
    owner = {sid: traders[i % 2] for i, sid in enumerate(sl)} | {sid: traders[i % 2] for i, sid in enumerate(timed)}
    used = {keys.partition_of(sid) for sid in sl + timed}
    assert len(used) >= 2, f"strategies landed in partitions {used} only"

    for sid in sl:
        await eventually(lambda sid=sid: owner[sid].has_position(sid, "bought"), timeout=25)
    await traders[0].tick("RELIANCE", 2400)  # under every stop
    for sid in sl + timed:
        await eventually(lambda sid=sid: owner[sid].has_status(sid, "exited"), timeout=30)
    assert {(await owner[sid].status(sid))["position"] for sid in sl} == {"exited_by_sl"}
    assert {(await owner[sid].status(sid))["position"] for sid in timed} == {"sold"}

    await asyncio.sleep(1)  # let any duplicate that slipped through arrive before counting
    orders = [o for t in traders for o in await t.broker_orders()]
    tags = [o["tag"] for o in orders]
    assert len(orders) == 2 * len(sl + timed)
    assert len(set(tags)) == len(tags), "a tag reached the broker twice"
    assert {o["status"] for o in orders} == {"COMPLETE"}

    async def logged() -> bool:
        for sid in sl + timed:
            rows = [(r["event_type"], r["status"]) for r in await owner[sid].logs(sid)]
            if sorted(rows) != sorted([("BUY", "success"), ("STOPLOSS" if sid in sl else "SELL", "success")]):
                return False
        return True

    await eventually(logged, timeout=15, message="order-log rows missing in Postgres")

    # The work really spread: every master holds some partition's streams.
    masters = set(cluster.master_ports().values())
    holding = 0
    for port in masters:
        node = redis.Redis(port=port)
        try:
            holding += any(node.cluster("countkeysinslot", keys.hash_slot(keys.orders_stream(p))) for p in
                           range(partitions))
        finally:
            node.close()
    assert holding == len(masters) == 3


async def test_a_master_failover_mid_run_still_exits_each_run_once(
        cluster: RedisClusterProcs, cluster_stack: Stack, http: aiohttp.ClientSession, partitions: int) -> None:
    trader = await Trader(http, cluster_stack).sign_up()
    await trader.tick("TCS", 3500)
    sl = await trader.strategy("TCS", buy_in_s=2, sell_in_s=120, stop_loss=3450, quantity=1)
    timed = await trader.strategy("TCS", buy_in_s=2, sell_in_s=14, stop_loss=3000, quantity=1)
    for sid in (sl, timed):
        await eventually(lambda sid=sid: trader.has_position(sid, "bought"), timeout=25)
    # The master of the stop-loss strategy's partition dies; its replica takes over.
    cluster.kill_master_of(keys.hash_slot(keys.strategy_key(sl)))
    # Under the stop of `sl` only, sent until it exits: ticks are missed while the services
    # move to the new primary (run_id change: reconcile, rebuild), and repeats are harmless.
    await eventually(lambda: trader.tick_until_exited(sl, "TCS", 3400), timeout=40)
    await eventually(lambda: trader.has_status(timed, "exited"), timeout=40)
    assert (await trader.status(sl))["position"] == "exited_by_sl"
    assert (await trader.status(timed))["position"] == "sold"
    await asyncio.sleep(1)  # room for a wrong duplicate to show up
    orders = await trader.broker_orders()
    assert sorted((o["transaction_type"], o["status"]) for o in orders) == [
        ("BUY", "COMPLETE"), ("BUY", "COMPLETE"), ("SELL", "COMPLETE"), ("SELL", "COMPLETE")]
    assert len({o["tag"] for o in orders}) == 4
