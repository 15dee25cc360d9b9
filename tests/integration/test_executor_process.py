"""The executor as a real subprocess: orders, health endpoints, SIGTERM, kill -9 takeover."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.schema import keys
from libs.schema.models import Position, StrategyStatus
from tests.integration.executor_support import (
    broker_orders,
    enqueue,
    executor_process,
    executor_settings,
    new_account,
    order_logs,
    running_executor,
    runtime,
    start_run,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin
from tests.support.runs import position_is, status_is

pytestmark = pytest.mark.timeout(90)


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
        return resp.read().decode()


async def test_subprocess_trades_reports_health_and_drains_on_sigterm(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, redis_url: str, clean_db: str, tmp_path: Path) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    settings = executor_settings(redis_url, clean_db, sim.base_url)
    log_path = tmp_path / "executor.log"
    with executor_process(settings, log_path) as proc:
        port = proc.health_port  # type: ignore[attr-defined]
        await enqueue(redis, run.buy())
        await eventually(lambda: position_is(redis, run, Position.bought), timeout=10)
        await enqueue(redis, run.sell())
        await eventually(lambda: status_is(engine, run, StrategyStatus.exited), timeout=10)
        assert '"status": "ok"' in get(port, "/healthz")
        assert '"redis": "ok"' in get(port, "/readyz")
        metrics = get(port, "/metrics")
        assert 'executor_events_total{event_type="BUY",outcome="success"} 1.0' in metrics
        assert "order_log_writer_lag" in metrics
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    output = log_path.read_text()
    assert "executor stopped processed=2 failed=0" in output
    assert run.account.access_token not in output and run.account.api_key not in output
    assert len(broker_orders(sim, run.tag("entry"))) == len(broker_orders(sim, run.tag("exit"))) == 1


async def test_sigterm_finishes_the_order_in_flight_before_exiting(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, redis_url: str, clean_db: str, tmp_path: Path) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    settings = executor_settings(redis_url, clean_db, sim.base_url)
    log_path = tmp_path / "executor.log"
    try:
        with executor_process(settings, log_path) as proc:
            sim.set_faults(latency_ms=700, routes=["orders"])
            await enqueue(redis, run.buy())
            await eventually(lambda: _pending(redis, 1), timeout=5)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        sim.set_faults()
    assert (await runtime(redis, run)).position == Position.bought
    assert await _pending(redis, 0)
    assert len(broker_orders(sim, run.tag("entry"))) == 1
    assert "executor stopped processed=1 failed=0" in log_path.read_text()
    rows = await _rows(engine, run, 1)  # flushed to Postgres before the process exited
    assert rows[0].status.value == "success"


async def test_killed_executor_mid_order_is_finished_by_another_with_one_broker_order(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, redis_url: str, clean_db: str, tmp_path: Path) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    settings = executor_settings(redis_url, clean_db, sim.base_url, broker_timeout_s=5.0)
    try:
        with executor_process(settings, tmp_path / "victim.log") as victim:
            await enqueue(redis, run.buy())
            await eventually(lambda: position_is(redis, run, Position.bought), timeout=10)
            # A SELL goes straight to POST /orders: the broker books it and holds
            # the reply (the simulator's latency fault would hold the request
            # before reading its body, and a killed client's order then never
            # reaches the book, which proves nothing).
            sim.set_faults(timeout_after_accept_rate=1.0, routes=["orders"])
            await enqueue(redis, run.sell())
            await eventually(lambda: _pending(redis, 1), timeout=5)
            await eventually(lambda: len(broker_orders(sim, run.tag("exit"))) == 1, timeout=5)  # booked, reply held
            victim.kill()
            victim.wait(5)
        async with running_executor(settings):
            await eventually(lambda: status_is(engine, run, StrategyStatus.exited), timeout=15)
            await eventually(lambda: _pending(redis, 0), timeout=10)
            rows = await eventually(lambda: _rows(engine, run, 3), timeout=10)
    finally:
        sim.set_faults()
    # The victim's order reached the book. The survivor's start-up reconciliation
    # found it by tag and ended the run; the claimed SELL entry was then skipped.
    kinds = sorted((r.event_type.value, r.status.value, r.response_payload.get("found_by_tag")) for r in rows)
    assert kinds == [("BUY", "success", False), ("SELL", "skipped", None), ("SELL", "success", True)]
    assert len(broker_orders(sim, run.tag("exit"))) == 1
    assert len(broker_orders(sim, run.tag("entry"))) == 1


async def _rows(engine: AsyncEngine, run, count: int) -> list:  # type: ignore[no-untyped-def]
    rows = await order_logs(engine, run)
    assert len(rows) == count, rows
    return rows


async def _pending(redis: Redis, count: int) -> bool:
    return (await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP))["pending"] == count


async def test_stoploss_after_a_crashed_sell_does_not_send_a_second_exit(
        redis: Redis, engine: AsyncEngine, sim: SimAdmin, redis_url: str, clean_db: str, tmp_path: Path) -> None:
    run = await start_run(engine, redis, await new_account(sim, engine, redis))
    # A claim idle well above the test's own steps: nobody may reclaim the victim's SELL before
    # the STOPLOSS below is queued, even on a loaded machine.
    settings = executor_settings(redis_url, clean_db, sim.base_url).model_copy(update={"claim_idle_ms": 4000})
    try:
        # The victim waits long on the broker's reply, so it still holds the SELL when killed.
        with executor_process(settings.model_copy(update={"broker_timeout_s": 15.0}),
                              tmp_path / "victim.log") as victim:
            await enqueue(redis, run.buy())
            await eventually(lambda: position_is(redis, run, Position.bought), timeout=10)
            sim.set_faults(timeout_after_accept_rate=1.0, routes=["orders"])
            await enqueue(redis, run.sell())
            await eventually(lambda: len(broker_orders(sim, run.tag("exit"))) == 1, timeout=5)
            async with running_executor(settings):
                victim.kill()
                victim.wait(5)
                sim.set_faults()
                # The listener fires before anyone reclaims the SELL: the runtime still says bought.
                assert (await runtime(redis, run)).position == Position.bought
                await enqueue(redis, run.stoploss(1400.0))
                await eventually(lambda: status_is(engine, run, StrategyStatus.exited), timeout=15)
                await eventually(lambda: _pending(redis, 0), timeout=10)
    finally:
        sim.set_faults()
    assert len(broker_orders(sim, run.tag("exit"))) == 1
    rows = await _rows(engine, run, 3)
    by_type = {r.event_type.value: r for r in rows}
    # Which exit is handled first depends on whether the SELL is reclaimed before the STOPLOSS
    # arrives; either way one of them finds the victim's order by tag and the other is skipped.
    exits = sorted((by_type["SELL"], by_type["STOPLOSS"]), key=lambda r: r.status.value != "success")
    assert [r.status.value for r in exits] == ["success", "skipped"]
    assert exits[0].response_payload["found_by_tag"]
