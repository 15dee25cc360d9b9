"""Helpers for the executor's integration tests: accounts, runs, events, executors.

Everything is real: a simulator account, rows in Postgres (via libs/schema/tables),
the `broker:{user_id}` hash with AES-GCM ciphertexts, the run loaded with
libs.trading.runs, events XADDed to `queue:orders`. `move_due_events` stands in
for the scheduler (moving due `schedule` members to the stream) so that RETRY
events flow without the scheduler service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.local.procs import free_port
from libs.broker.kite import api_key_fingerprint
from libs.schema import keys
from libs.schema.models import (
    Event,
    StoplossEvent,
    event_to_json,
)
from libs.schema.tables import BrokerCredential, OrderLog, Strategy, User
from libs.service.secretbox import SecretBox, generate_key
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import config_for, load_run, plan_run
from services.executor.service import ExecutorService
from services.executor.settings import ExecutorSettings
from tests.support.kite_sim import SimAdmin

# Re-exported (`x as x`): the executor's tests take every helper from this module.
from tests.support.runs import Account, Run
from tests.support.runs import engine_for as engine_for
from tests.support.runs import position_is as position_is
from tests.support.runs import runtime as runtime
from tests.support.runs import status_is as status_is
from tests.support.runs import strategy_row as strategy_row
from tests.support.services import running_service

SECRET_KEY = generate_key()
BOX = SecretBox.from_b64(SECRET_KEY)
CALENDAR = MarketCalendar("always_open")
REPO_ROOT = Path(__file__).resolve().parents[2]


def executor_settings(redis_url: str, database_url: str, sim_url: str, **overrides: Any) -> ExecutorSettings:
    """Return settings tuned for fast tests (short claim idle, quick retries)."""
    values: dict[str, Any] = dict(
        redis_url=redis_url, database_url=database_url, kite_root=sim_url, secret_key=SECRET_KEY,
        market_calendar="always_open", health_port=0, read_block_ms=200, claim_idle_ms=1500,
        claim_interval_s=0.3, max_deliveries=3, lock_ttl_ms=1500, lock_wait_s=3.0, broker_timeout_s=2.0, fill_timeout_s=2.0,
        retry_base_s=0.05, retry_cap_s=0.2, retry_max_attempts=3, shutdown_grace_s=5.0,
        redis_watch_interval_s=0.2, reconcile_pg_timeout_s=2.0, writer_backoff_max_s=0.5,
        # These tests enqueue a run's events themselves, long before the run's times
        # (23:59:57 IST: no scheduler fires them); the refusal of early events has its own test.
        event_early_tolerance_s=400 * 86400,
    )
    values.update(overrides)
    return ExecutorSettings(**values)


def executor_env(settings: ExecutorSettings, health_port: int) -> dict[str, str]:
    """Return the environment of an executor subprocess with these settings."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"TICKWISE_{name.upper()}"] = str(value)
    env["TICKWISE_HEALTH_PORT"] = str(health_port)
    env.pop("TICKWISE_CONSUMER_NAME", None)
    return env


async def write_broker_hash(redis: Redis, user_id: uuid.UUID, api_key: str, access_token: str) -> None:
    """Write `broker:{user_id}` as the API does: ciphertexts, fingerprint, validity."""
    await redis.hset(keys.broker_credentials_key(user_id), mapping={
        "api_key": BOX.encrypt(api_key, f"broker_credentials:{user_id}:api_key"),
        "access_token": BOX.encrypt(access_token, f"broker_credentials:{user_id}:access_token"),
        "api_key_fp": api_key_fingerprint(api_key), "is_valid": "1"})


async def new_account(sim: SimAdmin, engine: AsyncEngine, redis: Redis) -> Account:
    """Open a simulator account and register its owner in Postgres and Redis."""
    sim_account = await asyncio.to_thread(sim.create_account)
    user_id = uuid.uuid4()
    api_key, token = sim_account["api_key"], sim_account["access_token"]
    fp = api_key_fingerprint(api_key)
    async with engine.begin() as conn:
        await conn.execute(insert(User).values(id=user_id, name="Test User", email=f"{user_id}@example.com",
                                               password_hash="x"))
        await conn.execute(insert(BrokerCredential).values(
            user_id=user_id, api_key=BOX.encrypt(api_key, f"broker_credentials:{user_id}:api_key"),
            api_secret=BOX.encrypt(sim_account["api_secret"], f"broker_credentials:{user_id}:api_secret"),
            access_token=BOX.encrypt(token, f"broker_credentials:{user_id}:access_token"), is_valid=True,
            key_id=BOX.current_key_id, api_key_hint=api_key[-4:], api_key_fp=fp))
    await write_broker_hash(redis, user_id, api_key, token)
    return Account(user_id, api_key, token, fp)


async def start_run(engine: AsyncEngine, redis: Redis, account: Account, *, symbol: str = "INFY",
                    quantity: int = 1, stop_loss: float = 1.0, square_off: bool = False,
                    new_run: bool = False) -> Run:
    """Insert a running strategy and load its run into Redis, as the API's start does.

    `new_run`: load it as a start does (its first BUY may skip the tag lookup); by
    default as a rebuild reloads a run, so every BUY looks its tag up first.
    """
    # Far in the (IST) day, so the run's trading day is today and no scheduler would fire it.
    started_at = datetime.now(UTC)
    sid = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(insert(Strategy).values(
            id=sid, user_id=account.user_id, symbol=symbol, buy_time=datetime.strptime("23:59:57", "%H:%M:%S").time(),
            sell_time=datetime.strptime("23:59:58", "%H:%M:%S").time(), stop_loss=stop_loss, quantity=quantity,
            status="running", started_at=started_at))
        row = (await conn.execute(select(Strategy).where(Strategy.id == sid))).one()
    config = config_for(row, api_key_fp=account.api_key_fp)
    plan = plan_run(config, CALENDAR, started_at)
    await load_run(redis, config, plan, new_run=new_run)
    return Run(config, plan, account)


async def enqueue(redis: Redis, event: Event | bytes) -> str:
    """XADD an event (or raw bytes) to `queue:orders`, as its producer would; return the entry id.

    A STOPLOSS gets the listener's fired marker and a square-off the API's marker first,
    as their real producers set them (the executor refuses either without its marker).
    """
    if isinstance(event, StoplossEvent):
        await redis.set(keys.stoploss_marker_key(event.strategy_id, event.run_id), "1", ex=3600)
    elif not isinstance(event, bytes) and event.metadata.get("square_off"):
        await redis.set(keys.square_off_marker_key(event.strategy_id, event.run_id), "1", ex=3600)
    raw = event if isinstance(event, bytes) else event_to_json(event)
    return (await redis.xadd(keys.ORDERS_STREAM, {"event": raw})).decode()


async def order_logs(engine: AsyncEngine, run: Run) -> list[Any]:
    async with engine.connect() as conn:
        return (await conn.execute(select(OrderLog).where(OrderLog.strategy_id == run.config.strategy_id)
                                   .order_by(OrderLog.stream_msg_id))).all()


async def count_logs(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(OrderLog))).scalar_one())


def broker_orders(sim: SimAdmin, tag: str) -> list[dict[str, Any]]:
    return sim.orders(tag=tag)


async def move_due_events(redis: Redis, stop: asyncio.Event) -> None:
    """Stand in for the scheduler: move due `schedule` members to `queue:orders`."""
    while not stop.is_set():
        now_ms = int(time.time() * 1000)
        for member in await redis.zrangebyscore(keys.SCHEDULE, "-inf", now_ms):
            if await redis.zrem(keys.SCHEDULE, member):
                await redis.xadd(keys.ORDERS_STREAM, {"event": member})
        await asyncio.sleep(0.02)  # the stand-in scheduler's polling period


@contextlib.asynccontextmanager
async def fake_scheduler(redis: Redis) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(move_due_events(redis, stop))
    try:
        yield
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def running_executor(settings: ExecutorSettings) -> AsyncIterator[ExecutorService]:
    """Run an executor in this process until the block ends (then drain it)."""
    service = ExecutorService(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait([task, ready], timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    try:
        yield service
    finally:
        stop.set()
        ready.cancel()
        await asyncio.wait_for(task, 20)


@contextlib.contextmanager
def executor_process(settings: ExecutorSettings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m services.executor` as a real subprocess, ready on /readyz and consuming."""
    port = free_port()
    with running_service("services.executor", executor_env(settings, port), port, log_path,
                         also=lambda: "executor consuming" in log_path.read_text(), stop_timeout=20) as service:
        service.proc.health_port = port  # type: ignore[attr-defined]
        yield service.proc
