"""Helpers for pipeline tests: Postgres rows, Redis runs, executor-like position changes, subprocesses.

Rows go through `libs.schema.tables`, runs through `libs.trading.runs.load_run`,
and position changes the way the executor makes them (HSET runtime position
plus a `position` control message in one step, as its commit script does), so the services under test
see exactly what production would give them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.schema import keys
from libs.schema.codec import dumps, loads
from libs.schema.models import (
    ControlMessage,
    Position,
    RuntimeState,
    StrategyConfig,
    StrategyStatus,
    parse_event,
)
from libs.schema.tables import BrokerCredential, Strategy, User
from libs.trading.calendar import IST, MarketCalendar
from libs.trading.runs import config_for, load_run, plan_run
from tests.support.runs import Run
from tests.support.runs import engine_for as engine_for
from tests.support.services import Service, running_service

REPO_ROOT = Path(__file__).resolve().parents[2]
ALWAYS_OPEN = MarketCalendar("always_open")


def ist_time(moment: datetime) -> clock_time:
    """Return the IST wall-clock time of `moment`, to the second (ClockTime precision)."""
    return moment.astimezone(IST).time().replace(microsecond=0)


async def insert_user(engine: AsyncEngine, *, api_key_fp: str = "fp-test") -> uuid.UUID:
    """Insert a user with (fake ciphertext) broker credentials; return the user id."""
    user_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(User.__table__.insert().values(
            id=user_id, name="Test", email=f"{user_id}@example.com", password_hash="x"))
        await conn.execute(BrokerCredential.__table__.insert().values(
            user_id=user_id, api_key=f"v1.k.apikey-{user_id}", api_secret="v1.k.secret",
            access_token=f"v1.k.token-{user_id}", is_valid=True, key_id="k", api_key_hint="abcd",
            api_key_fp=api_key_fp))
    return user_id


async def insert_running_strategy(engine: AsyncEngine, user_id: uuid.UUID, *, symbol: str = "INFY",
                                  buy_at: datetime, sell_at: datetime | None = None, stop_loss: float = 1400.0,
                                  started_at: datetime | None = None, quantity: int = 1) -> Run:
    """Insert a running strategy whose BUY is due at `buy_at` (to the second); return its run."""
    started_at = started_at or (buy_at - timedelta(seconds=60))
    values = dict(id=uuid.uuid4(), user_id=user_id, symbol=symbol, buy_time=ist_time(buy_at),
                  sell_time=ist_time(sell_at or buy_at + timedelta(minutes=5)), stop_loss=stop_loss,
                  quantity=quantity, status=StrategyStatus.running, started_at=started_at)
    async with engine.begin() as conn:
        await conn.execute(Strategy.__table__.insert().values(**values))
    row = Strategy(**values)
    config = config_for(row, api_key_fp="fp-test")
    return Run(config, plan_run(config, ALWAYS_OPEN, started_at), row=row)


async def start_run(redis: Redis, engine: AsyncEngine, user_id: uuid.UUID, **kwargs: Any) -> Run:
    """Insert a running strategy and load it into Redis, as the API's start does."""
    run = await insert_running_strategy(engine, user_id, **kwargs)
    await load_run(redis, run.config, run.plan)
    return run


async def set_position(redis: Redis, config: StrategyConfig, position: Position) -> None:
    """Change runtime position and tell listeners in one step (a MULTI here; the executor's commit script)."""
    fields = RuntimeState.hash_fields(position=position, updated_at=datetime.now(UTC))
    msg = ControlMessage(action="position", strategy_id=config.strategy_id, symbol=config.symbol,
                         stop_loss=config.stop_loss, position=position, run_id=config.run_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.runtime_key(config.strategy_id), mapping=fields)
        pipe.xadd(keys.CONTROL_STREAM, {"event": dumps(msg)})
        await pipe.execute()


async def stream_events(redis: Redis) -> list[Any]:
    """Return every event on queue:orders, parsed."""
    return [parse_event(fields[b"event"]) for _, fields in await redis.xrange(keys.ORDERS_STREAM)]


async def stream_members(redis: Redis) -> list[bytes]:
    """Return the raw `event` field of every queue:orders entry."""
    return [fields[b"event"] for _, fields in await redis.xrange(keys.ORDERS_STREAM)]


def member_strategy(member: bytes) -> str:
    return str(loads(member)["strategy_id"])


# --- subprocesses ------------------------------------------------------------------------------------------

@contextmanager
def run_service(module: str, env: dict[str, str], log_dir: Path, name: str | None = None,
                ready_timeout: float = 20.0) -> Iterator[Service]:
    """Run `python -m <module>` with `env` on top of ours; wait for /readyz; stop it afterwards."""
    from deploy.local.procs import free_port

    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TICKWISE_HEALTH_PORT": str(port),
                "TICKWISE_MARKET_CALENDAR": "always_open", **env}
    log_path = log_dir / f"{name or module.rsplit('.', 1)[-1]}-{port}.log"
    with running_service(module, full_env, port, log_path, ready_timeout=ready_timeout) as service:
        yield service


def listener_env(redis_url: str, sim_url: str, account: dict[str, Any], **extra: str) -> dict[str, str]:
    """Return the environment of a market listener reading ticks with `account` from the simulator."""
    from tests.support.kite_sim import ws_root

    return {"REDIS_URL": redis_url, "TICKWISE_KITE_ROOT": sim_url, "TICKWISE_KITE_WS_ROOT": ws_root(sim_url),
            "TICKWISE_MARKET_DATA_API_KEY": account["api_key"],
            "TICKWISE_MARKET_DATA_ACCESS_TOKEN": account["access_token"],
            # The session simulator's random walk is off: only pushed ticks arrive, so silence is normal.
            "TICKWISE_WATCHDOG_SILENCE_S": "3600", **extra}


def health_field(service: Service, name: str) -> Any:
    """Return one field of the service's /healthz body."""
    return service.get("/healthz")[1].get(name)
