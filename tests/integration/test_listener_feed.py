"""The market listener keeps its feed alive: reconnects, reports an expired token, exits when lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from deploy.local.procs import free_port
from libs.schema.models import EventType, Position
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
from tests.integration.test_listener_stoploss import _url
from tests.support.eventually import eventually, eventually_sync
from tests.support.kite_sim import SimAdmin

LISTENER = "services.market_listener"


async def _bought_run(redis: Redis, clean_db: str, stop_loss: float = 1400.0):
    engine = engine_for(clean_db)
    user = await insert_user(engine)
    run = await start_run(redis, engine, user, buy_at=datetime.now(UTC) + timedelta(minutes=10),
                          stop_loss=stop_loss)
    await set_position(redis, run.config, Position.bought)
    await engine.dispose()
    return run


async def test_stoploss_fires_after_the_simulator_drops_the_socket(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    run = await _bought_run(redis, clean_db)
    account = sim.create_account("market-data")
    with run_service(LISTENER, listener_env(_url(redis), sim.base_url, account), tmp_path) as listener:
        await eventually(lambda: health_field(listener, "watched") == 1, timeout=10)
        await eventually(lambda: health_field(listener, "feed") == "connected")
        assert sim.drop_ws(abort=True) == 1

        async def crossing_tick_fires() -> bool:
            sim.ticks(("INFY", 1399.0))  # ticks sent while reconnecting are lost: keep pushing
            return any(e.event_type == EventType.STOPLOSS for e in await stream_events(redis))

        await eventually(crossing_tick_fires, timeout=15, interval=0.2)
    events = [e for e in await stream_events(redis) if e.event_type == EventType.STOPLOSS]
    assert [str(e.strategy_id) for e in events] == [run.id]


async def test_expired_market_data_token_makes_healthz_503(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    await _bought_run(redis, clean_db)
    account = sim.create_account("market-data")
    with run_service(LISTENER, listener_env(_url(redis), sim.base_url, account), tmp_path) as listener:
        await eventually(lambda: health_field(listener, "feed") == "connected", timeout=10)
        assert listener.get("/healthz")[0] == 200
        sim.expire(account["api_key"])
        status, body = eventually_sync(lambda: _unhealthy(listener), timeout=15, interval=0.1)
        assert status == 503 and body["ok"] is False and body["feed"] == "token_expired"
        assert listener.get("/readyz")[0] == 200  # Redis is fine; the feed is what is broken
    assert "market data token expired" in listener.log_text()


def _unhealthy(listener) -> tuple[int, dict] | None:
    status, body = listener.get("/healthz")
    return (status, body) if status != 200 else None


async def test_listener_exits_non_zero_when_the_feed_cannot_be_restored(
        redis: Redis, clean_db: str, sim: SimAdmin, tmp_path: Path) -> None:
    await _bought_run(redis, clean_db)
    account = sim.create_account("market-data")
    dead_ws = f"ws://127.0.0.1:{free_port()}/ws"  # nothing listens there
    env = listener_env(_url(redis), sim.base_url, account, TICKWISE_KITE_WS_ROOT=dead_ws,
                       TICKWISE_WATCHDOG_SILENCE_S="1", TICKWISE_WATCHDOG_MAX_ATTEMPTS="2")
    with run_service(LISTENER, env, tmp_path) as listener:
        rc = eventually_sync(lambda: listener.proc.poll(), timeout=15, interval=0.1)
        assert rc == 2
    assert "feed lost" in listener.log_text()
