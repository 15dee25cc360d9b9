"""The order-log writer: idempotent inserts, terminal statuses, Postgres outages, bad rows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.local.procs import PostgresServer
from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.models import OrderLogRow, OrderLogStatus, Position, StrategyStatus, order_log_id
from libs.service.outage import POSTGRES_UNAVAILABLE
from services.executor import metrics
from services.executor.consumer import ensure_group
from services.executor.log_writer import OrderLogWriter
from tests.integration.executor_support import (
    Run,
    enqueue,
    new_account,
    order_logs,
    running_executor,
    start_run,
    strategy_row,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin
from tests.support.runs import position_is

pytestmark = pytest.mark.timeout(90)


def row_for(run: Run, msg_id: str, **extra: object) -> OrderLogRow:
    return OrderLogRow(id=order_log_id(keys.ORDERS_STREAM, msg_id), strategy_id=run.config.strategy_id,
                       event_type="SELL", status="success", trading_day=run.plan.trading_day,
                       stream_msg_id=msg_id, created_at=datetime.now(UTC), run_id=run.config.run_id,
                       **extra)  # type: ignore[arg-type]


async def test_a_row_delivered_twice_is_inserted_once_and_applies_its_status(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, settings) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    row = dumps(row_for(run, "1700000000000-0", strategy_status="exited"))
    async with running_executor(settings) as service:
        await redis.xadd(keys.ORDER_LOGS_STREAM, {"row": row})
        await redis.xadd(keys.ORDER_LOGS_STREAM, {"row": row})
        await eventually(lambda: service.writer.written == 2)
    rows = await order_logs(engine, run)
    assert len(rows) == 1 and rows[0].user_id == run.account.user_id  # filled in from strategies
    assert (await strategy_row(engine, run)).status == StrategyStatus.exited
    assert await redis.xlen(keys.ORDER_LOGS_STREAM) == 0


async def test_status_of_an_older_run_does_not_touch_a_newer_one(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                                 settings) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    stale = row_for(run, "1700000000001-0", strategy_status="failed").model_copy(
        update={"run_id": "2020-01-01T00:00:00.000000+00:00"})
    async with running_executor(settings) as service:
        await redis.xadd(keys.ORDER_LOGS_STREAM, {"row": dumps(stale)})
        await eventually(lambda: service.writer.written == 1)
    assert (await strategy_row(engine, run)).status == StrategyStatus.running


async def test_malformed_and_orphan_rows_go_to_dead_letters(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                            settings) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    orphan = row_for(run, "1700000000002-0").model_copy(update={"strategy_id": run.account.user_id})
    async with running_executor(settings) as service:
        await redis.xadd(keys.ORDER_LOGS_STREAM, {"row": b"{broken"})
        await redis.xadd(keys.ORDER_LOGS_STREAM, {"row": dumps(orphan)})
        await redis.xadd(keys.ORDER_LOGS_STREAM, {"row": dumps(row_for(run, "1700000000003-0"))})
        await eventually(lambda: service.writer.written == 1)
        dead = await eventually(lambda: _entries(redis, keys.ORDER_LOGS_DEAD_STREAM, 2))
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert reasons[0].startswith("malformed row") and reasons[1].startswith("unknown strategy")
    assert len(await order_logs(engine, run)) == 1


async def test_rows_wait_out_a_postgres_outage_while_trading_goes_on(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, settings, pg_server: PostgresServer) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    async with engine.connect() as conn:
        # The session server runs with synchronous_commit=off; an immediate stop
        # would otherwise lose the rows this test just wrote.
        await conn.execute(text("CHECKPOINT"))
    await engine.dispose()
    async with running_executor(settings) as service:
        await asyncio.to_thread(pg_server.stop, mode="immediate")
        try:
            await enqueue(redis, run.buy())
            await eventually(lambda: position_is(redis, run, Position.bought), timeout=10)
            await enqueue(redis, run.sell())
            await eventually(lambda: _unloaded(redis, run), timeout=10)
            pending = await redis.xpending(keys.ORDER_LOGS_STREAM, keys.LOG_WRITERS_GROUP)
            assert service.writer.written == 0 and pending["pending"] + await _unread(redis) >= 1
        finally:
            await asyncio.to_thread(pg_server.start, fsync=False)
        rows = await eventually(lambda: _logs(engine, run, 2), timeout=30)
    assert [(r.event_type.value, r.status.value) for r in rows] == [("BUY", "success"), ("SELL", "success")]
    assert (await strategy_row(engine, run)).status == StrategyStatus.exited


async def _logs(engine: AsyncEngine, run: Run, count: int) -> list:
    try:
        rows = await order_logs(engine, run)
    except POSTGRES_UNAVAILABLE as error:  # Postgres may still be recovering
        raise AssertionError(str(error)) from error
    assert len(rows) == count, rows
    return rows


async def _unread(redis: Redis) -> int:
    groups = await redis.xinfo_groups(keys.ORDER_LOGS_STREAM)
    return sum(int(g.get("lag") or 0) for g in groups)


async def _entries(redis: Redis, stream: str, count: int) -> list:
    entries = await redis.xrange(stream)
    assert len(entries) >= count, entries
    return entries


async def _unloaded(redis: Redis, run: Run) -> bool:
    return not await redis.exists(keys.strategy_key(run.sid))


async def test_a_batch_keeps_every_column_and_payload(redis: Redis, engine: AsyncEngine, sim: SimAdmin,
                                                      settings) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    payload = {"order": {"tag": "TWX", "quantity": 3}, "note": "prix é", "price": 1234.05,
               "none": None}
    rows = [row_for(run, f"1700000000001-{i}", request_payload=payload, response_payload={"i": i},
                    broker_order_id=f"OID{i}", tag="TWX").model_copy(
                update={"status": OrderLogStatus.failed if i else OrderLogStatus.success})
            for i in range(3)]
    async with running_executor(settings) as service:
        for row in rows:
            await redis.xadd(keys.ORDER_LOGS_STREAM, {"row": dumps(row)})
        await eventually(lambda: service.writer.written == 3)
    stored = await order_logs(engine, run)
    assert [(r.id, r.status.value, r.event_type.value, r.request_payload, r.response_payload, r.broker_order_id,
             r.tag, r.stream_msg_id, r.trading_day, r.created_at, r.user_id) for r in stored] == [
        (row.id, row.status.value, "SELL", payload, {"i": i}, f"OID{i}", "TWX", row.stream_msg_id,
         row.trading_day, row.created_at, run.account.user_id) for i, row in enumerate(rows)]


class _BuggyWriter(OrderLogWriter):
    """A writer whose insert has a bug (not an outage): Postgres is up the whole time."""

    async def _commit(self, rows: list) -> dict[str, str]:
        raise RuntimeError("a bug in the insert")


async def test_a_bug_in_the_insert_is_raised_not_waited_out_and_loses_no_row(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    await ensure_group(redis, keys.ORDER_LOGS_STREAM, keys.LOG_WRITERS_GROUP)
    await redis.xadd(keys.ORDER_LOGS_STREAM, {"row": dumps(row_for(run, "1700000000004-0"))})
    writer = _BuggyWriter(redis, engine, "buggy", batch=10, block_ms=100, claim_idle_ms=1000, backoff_max_s=1.0)
    reply = await redis.xreadgroup(keys.LOG_WRITERS_GROUP, "buggy", {keys.ORDER_LOGS_STREAM: ">"}, count=10)
    entries = [(i.decode(), f) for _s, es in reply for i, f in es]
    metrics.WRITER_UP.set(1)
    # Were the bug taken for an outage, write() would retry it for ever (the test would time out)
    # and report Postgres down; it goes up to the loop, which logs its traceback and carries on.
    with pytest.raises(RuntimeError, match="a bug in the insert"):
        await asyncio.wait_for(writer.write(entries, asyncio.Event()), 10)
    assert REGISTRY.get_sample_value("order_log_writer_postgres_up") == 1  # not reported as Postgres down
    # Nothing acked: the row is claimed again and inserted once the bug is gone.
    assert (await redis.xpending(keys.ORDER_LOGS_STREAM, keys.LOG_WRITERS_GROUP))["pending"] == 1
    assert await order_logs(engine, run) == []
