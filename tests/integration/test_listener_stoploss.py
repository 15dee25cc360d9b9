"""The market listener fires one STOPLOSS per bought strategy run when the price crosses its stop."""

from __future__ import annotations

import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from libs.schema import keys
from libs.schema.models import EventType, Position
from libs.trading.runs import unload_run
from tests.integration.pipeline_support import (
    engine_for,
    health_field,
    insert_user,
    listener_env,
    run_service,
    set_position,
    start_run,
    stream_events,
)
from tests.support.eventually import eventually
from tests.support.kite_sim import SimAdmin

LISTENER = "services.market_listener"


async def _runs(redis: Redis, clean_db: str, stops: list[float], symbol: str = "INFY") -> tuple[list, uuid.UUID]:
    engine = engine_for(clean_db)
    user = await insert_user(engine)
    buy_at = datetime.now(UTC) + timedelta(minutes=10)
    runs = [await start_run(redis, engine, user, symbol=symbol, buy_at=buy_at, stop_loss=s) for s in stops]
    await engine.dispose()
    return runs, user


async def _stoplosses(redis: Redis) -> list:
    return [e for e in await stream_events(redis) if e.event_type == EventType.STOPLOSS]


async def test_stoploss_fires_once_when_price_crosses_and_keeps_falling(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    (bought, idle), _ = await _runs(redis, clean_db, [1400.0, 1450.0])
    account = sim.create_account("market-data")
    with run_service(LISTENER, listener_env(_url(redis), sim.base_url, account), tmp_path) as listener:
        await eventually(lambda: health_field(listener, "subscribed") == 1, timeout=10)
        await set_position(redis, bought.config, Position.bought)
        await eventually(lambda: health_field(listener, "watched") == 1)
        sim.ticks(("INFY", 1460.0))
        await eventually(lambda: _price_is(redis, "INFY", 1460.0))
        assert await _stoplosses(redis) == []
        sim.ticks(("INFY", 1400.0))
        await eventually(lambda: _count_is(redis, 1))
        sim.ticks(("INFY", 1390.0))
        sim.ticks(("INFY", 1380.0))
        await eventually(lambda: _price_is(redis, "INFY", 1380.0))
        metrics = _metrics(listener)
        assert "listener_tick_to_trigger_seconds_count 1.0" in metrics
        assert "listener_stoploss_fired_total 1.0" in metrics
        assert "listener_ticks_per_second" in metrics
        assert listener.stop() == 0
    events = await _stoplosses(redis)
    assert len(events) == 1
    event = events[0]
    assert str(event.strategy_id) == bought.id
    assert event.trigger_price == 1400.0 and event.price == 1400.0
    assert event.run_id == bought.config.run_id and event.trading_day == bought.plan.trading_day
    assert await redis.exists(keys.stoploss_marker_key(bought.id, bought.config.run_id))
    assert str(idle.row.id) not in {str(e.strategy_id) for e in events}  # position none: never fired
    assert '"market listener stopped"' in listener.log_text()


async def test_stoploss_fires_for_exactly_the_strategies_at_or_above_the_price(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    runs, _ = await _runs(redis, clean_db, [1410.0, 1420.0, 1430.0, 1440.0, 1450.0])
    account = sim.create_account("market-data")
    with run_service(LISTENER, listener_env(_url(redis), sim.base_url, account), tmp_path) as listener:
        await eventually(lambda: health_field(listener, "subscribed") == 1, timeout=10)
        for run in runs:
            await set_position(redis, run.config, Position.bought)
        await eventually(lambda: health_field(listener, "watched") == 5)
        sim.ticks(("INFY", 1430.0))
        await eventually(lambda: _count_is(redis, 3))
        assert {str(e.strategy_id) for e in await _stoplosses(redis)} == {r.id for r in runs[2:]}
        sim.ticks(("INFY", 1415.0))
        await eventually(lambda: _count_is(redis, 4))
        assert str((await _stoplosses(redis))[-1].strategy_id) == runs[1].id
        assert health_field(listener, "watched") == 1


async def test_two_listener_processes_emit_one_stoploss_per_strategy(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    runs, _ = await _runs(redis, clean_db, [1400.0 + i for i in range(20)])
    for run in runs:
        await set_position(redis, run.config, Position.bought)
    account = sim.create_account("market-data")
    env = listener_env(_url(redis), sim.base_url, account)
    with run_service(LISTENER, env, tmp_path, "listener-a") as first, \
            run_service(LISTENER, env, tmp_path, "listener-b") as second:
        for listener in (first, second):
            await eventually(lambda listener=listener: health_field(listener, "watched") == 20, timeout=10)
        sim.ticks(("INFY", 1399.0))
        await eventually(lambda: health_field(first, "watched") == 0 and health_field(second, "watched") == 0)
        assert first.stop() == 0 and second.stop() == 0
    events = await _stoplosses(redis)
    assert sorted(str(e.strategy_id) for e in events) == sorted(r.id for r in runs)


async def test_listener_unsubscribes_when_the_last_strategy_of_a_symbol_stops(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    (tcs,), _ = await _runs(redis, clean_db, [3000.0], symbol="TCS")
    (infy,), _ = await _runs(redis, clean_db, [1000.0], symbol="INFY")
    account = sim.create_account("market-data")
    with run_service(LISTENER, listener_env(_url(redis), sim.base_url, account), tmp_path) as listener:
        await eventually(lambda: health_field(listener, "subscribed") == 2, timeout=10)
        sim.ticks(("TCS", 3800.0))
        await eventually(lambda: _price_is(redis, "TCS", 3800.0))
        await unload_run(redis, tcs.config, tcs.plan)
        await eventually(lambda: health_field(listener, "subscribed") == 1)
        # One frame carries both ticks: once INFY's price lands, TCS's would have too, had the
        # listener still been subscribed to it (the unsubscribe message went out before).
        await eventually(lambda: _ticks_until_price(sim, redis, [("TCS", 3700.0), ("INFY", 1490.0)], "INFY"))
        assert float(await redis.get(keys.price_key("TCS"))) == 3800.0
        assert health_field(listener, "subscribed") == 1 and infy.id


async def _ticks_until_price(sim: SimAdmin, redis: Redis, ticks: list[tuple[str, float]], symbol: str) -> bool:
    sim.ticks(*ticks)
    return await _price_is(redis, symbol, dict(ticks)[symbol])


def _metrics(service) -> str:  # noqa: ANN001
    with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/metrics", timeout=2) as resp:
        return resp.read().decode()


def _url(redis: Redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


async def _price_is(redis: Redis, symbol: str, price: float) -> bool:
    raw = await redis.get(keys.price_key(symbol))
    return raw is not None and float(raw) == price


async def _count_is(redis: Redis, n: int) -> bool:
    return len(await _stoplosses(redis)) == n
