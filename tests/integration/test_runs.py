"""Loading and unloading a strategy run in real Redis."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

from libs.schema import keys
from libs.schema.codec import loads
from libs.schema.models import StrategyConfig, parse_event
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import load_run, plan_run, run_id_for, unload_run


def _config() -> tuple[StrategyConfig, datetime]:
    started = datetime.now(UTC)
    return StrategyConfig(strategy_id=uuid4(), user_id=uuid4(), symbol="INFY", buy_time="09:30:00",
                          sell_time="15:00:00", stop_loss=1500.25, quantity=5, status="running",
                          run_id=run_id_for(started)), started


async def test_load_writes_every_key_and_unload_removes_them(redis) -> None:
    config, started = _config()
    plan = plan_run(config, MarketCalendar("always_open"), started)
    sid = str(config.strategy_id)
    await load_run(redis, config, plan)

    assert StrategyConfig.model_validate_json(await redis.get(keys.strategy_key(sid))) == config
    assert (await redis.hgetall(keys.runtime_key(sid)))[b"position"] == b"none"
    assert await redis.smembers(keys.symbol_strategies_key("INFY")) == {sid.encode()}
    members = await redis.zrange(keys.SCHEDULE, 0, -1, withscores=True)
    events = [(parse_event(m).event_type.value, int(s)) for m, s in members]
    assert events == [("BUY", plan.buy_due_ms), ("SELL", plan.sell_due_ms)]
    control = await redis.xrange(keys.CONTROL_STREAM)
    assert loads(control[-1][1][b"event"])["action"] == "started"

    assert await unload_run(redis, config, plan) is True
    for key in (keys.strategy_key(sid), keys.runtime_key(sid), keys.symbol_strategies_key("INFY")):
        assert not await redis.exists(key)
    assert await redis.zcard(keys.SCHEDULE) == 0
    control = await redis.xrange(keys.CONTROL_STREAM)
    assert loads(control[-1][1][b"event"])["action"] == "stopped"
    assert await unload_run(redis, config, plan) is False


async def test_two_strategies_on_one_symbol_share_the_set(redis) -> None:
    cal = MarketCalendar("always_open")
    (a, sa), (b, sb) = _config(), _config()
    await load_run(redis, a, plan_run(a, cal, sa))
    await load_run(redis, b, plan_run(b, cal, sb))
    await unload_run(redis, a, plan_run(a, cal, sa))
    assert await redis.smembers(keys.symbol_strategies_key("INFY")) == {str(b.strategy_id).encode()}
    assert await redis.zcard(keys.SCHEDULE) == 2
