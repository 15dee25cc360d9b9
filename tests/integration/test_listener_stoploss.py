"""The market listener fires one STOPLOSS per bought strategy run when the price crosses its stop."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from libs.schema import keys
from libs.schema.models import EventType, Position, RuntimeState
from libs.trading.runs import load_run, unload_run
from tests.integration.pipeline_support import (
    engine_for,
    health_field,
    insert_running_strategy,
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
        # The unsubscribe reaches the broker asynchronously after the listener's own state
        # changes, so probe until it has: one frame carries a TCS and an INFY tick; once INFY's
        # price lands (and the 100 ms price throttle has passed), TCS's must not have. If the
        # listener never unsubscribed, every probe overwrites TCS and this times out.
        probe = iter(range(1, 1000))
        await eventually(lambda: _tcs_ignored(sim, redis, 1490.0 + next(probe)), timeout=10, interval=0.05)
        assert health_field(listener, "subscribed") == 1 and infy.id


async def _tcs_ignored(sim: SimAdmin, redis: Redis, infy_price: float) -> bool:
    await redis.set(keys.price_key("TCS"), "3800.0")
    sim.ticks(("TCS", 3700.0), ("INFY", infy_price))
    await eventually(lambda: _price_is(redis, "INFY", infy_price), timeout=5)
    await asyncio.sleep(0.25)  # a throttled TCS write, had one been due, lands within 100 ms
    return await _price_is(redis, "TCS", 3800.0)


def _metrics(service) -> str:
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


async def test_a_run_loaded_back_already_bought_is_watched(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    """A rebuild reloads a lost run with the runtime reconciled from the broker: no `position` message."""
    (anchor,), user = await _runs(redis, clean_db, [1000.0])
    account = sim.create_account("market-data")
    with run_service(LISTENER, listener_env(_url(redis), sim.base_url, account), tmp_path) as listener:
        await eventually(lambda: health_field(listener, "subscribed") == 1, timeout=10)
        engine = engine_for(clean_db)
        run = await insert_running_strategy(engine, user, buy_at=datetime.now(UTC) + timedelta(minutes=10),
                                            stop_loss=1400.0)
        await engine.dispose()
        await load_run(redis, run.config, run.plan,
                       runtime=RuntimeState(position=Position.bought, updated_at=datetime.now(UTC)))
        await eventually(lambda: health_field(listener, "watched") == 1)
        sim.ticks(("INFY", 1399.0))
        await eventually(lambda: _count_is(redis, 1))
    assert [str(e.strategy_id) for e in await _stoplosses(redis)] == [run.id] and anchor.id


async def test_a_watch_starting_below_its_stop_fires_without_waiting_for_a_tick(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    """The entry filled under the stop-loss: the last price already crossed it; the next tick may never come."""
    (run,), _ = await _runs(redis, clean_db, [1400.0])
    account = sim.create_account("market-data")
    with run_service(LISTENER, listener_env(_url(redis), sim.base_url, account), tmp_path):
        await eventually(lambda: _price_after_tick(sim, redis, 1390.0), timeout=10, interval=0.2)
        sim.ticks(("INFY", 1395.0))  # once its price lands, no earlier tick is still on the way
        await eventually(lambda: _price_is(redis, "INFY", 1395.0))
        await set_position(redis, run.config, Position.bought)
        await eventually(lambda: _count_is(redis, 1))
    (event,) = await _stoplosses(redis)
    assert str(event.strategy_id) == run.id and event.trigger_price == 1395.0


async def _price_after_tick(sim: SimAdmin, redis: Redis, price: float) -> bool:
    sim.ticks(("INFY", price))  # again until subscribed: ticks before the subscription are not seen
    return await _price_is(redis, "INFY", price)


async def test_a_stoploss_redis_refused_is_retried_without_another_tick(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    """The crossing tick came while Redis refused the trigger; the price then sat still below the stop."""
    (run,), _ = await _runs(redis, clean_db, [1400.0])
    await set_position(redis, run.config, Position.bought)
    # A listener user that may do everything but run the trigger script (a stand-in for a Redis blip).
    await redis.acl_setuser("nofire", enabled=True, passwords=["+pw-nofire"], keys=["*"], channels=["*"],
                            commands=["+@all", "-eval", "-evalsha", "-script"])
    try:
        limited = _url(redis).replace("redis://", "redis://nofire:pw-nofire@")
        account = sim.create_account("market-data")
        with run_service(LISTENER, listener_env(limited, sim.base_url, account), tmp_path) as listener:
            await eventually(lambda: health_field(listener, "watched") == 1, timeout=10)
            await eventually(lambda: _price_after_tick(sim, redis, 1390.0), timeout=10, interval=0.2)
            # Once a last, distinct tick has been refused too, no tick is left on the way.
            refused = listener.log_text().count("stoploss not emitted")
            sim.ticks(("INFY", 1395.0))
            await eventually(lambda: _price_is(redis, "INFY", 1395.0))
            await eventually(lambda: listener.log_text().count("stoploss not emitted") > refused)
            await redis.acl_setuser("nofire", commands=["+eval", "+evalsha", "+script"])
            await eventually(lambda: _count_is(redis, 1))
    finally:
        await redis.acl_deluser("nofire")
    (event,) = await _stoplosses(redis)
    assert str(event.strategy_id) == run.id and event.trigger_price == 1395.0
