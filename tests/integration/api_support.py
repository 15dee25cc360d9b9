"""Fixtures and helpers for the API tests: the real app on real Redis, Postgres and the Kite simulator.

Use them with `pytest_plugins = ["tests.integration.api_support"]` in a test module.
`api` serves `services.api` in-process through aiohttp's test server; `run_api_process` runs
`python -m services.api` as a real subprocess.

PYTEST_DONT_REWRITE: test modules import helpers from here before pytest registers
it as a plugin, so its asserts carry their own messages instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from deploy.local.procs import free_port
from libs.service.logging import configure_logging
from libs.service.secretbox import generate_key
from libs.trading.calendar import IST
from services.api.app import build_app
from services.api.settings import ApiSettings
from tests.support.services import running_service

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET_KEY = generate_key()
PASSWORD = "correct-horse-battery"


def make_settings(redis_url: str, database_url: str, sim_url: str, **overrides: Any) -> ApiSettings:
    """Return test settings: paper broker, always-open calendar, cheap argon2."""
    values: dict[str, Any] = {
        "redis_url": redis_url, "database_url": database_url, "secret_key": SECRET_KEY,
        "market_calendar": "always_open", "kite_root": sim_url, "argon2_time_cost": 1,
        "argon2_memory_kib": 8192, "kite_timeout_s": 3.0, "stop_lock_wait_s": 1.0,
        # No notification deliverer: fuzzed webhook URLs must never be called (e2e tests cover delivery).
        "notify_enabled": False,
    }
    values.update(overrides)
    return ApiSettings(**values)


def clock(offset_s: int) -> str:
    """Return an IST wall-clock time `offset_s` (up to 3 h) ahead, as HH:MM:SS, never firing in a test.

    From 21:00 IST on, `now + offset` could cross midnight and put a sell
    before its buy, so the base moves 12 h back: the times are then earlier
    than now, a start schedules them for the next day, and their order holds.
    """
    now = datetime.now(IST)
    base = now if now.hour < 21 else now - timedelta(hours=12)
    return (base + timedelta(seconds=offset_s)).strftime("%H:%M:%S")


@dataclass
class User:
    id: str
    email: str
    token: str
    password: str = PASSWORD
    broker: dict[str, str] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Reply:
    status: int
    body: Any
    text: str
    headers: Any


class ApiHarness:
    """Call the API like a client would; remember every response text for secret scans."""

    def __init__(self, client: TestClient, app: web.Application, sim: Any) -> None:
        self.client, self.app, self.sim = client, app, sim
        self.texts: list[str] = []

    async def call(self, method: str, path: str, body: Any = None, *, user: User | None = None,
                   data: bytes | None = None, headers: dict[str, str] | None = None,
                   expect: int | None = None) -> Reply:
        hdrs = dict(headers or {})
        if user is not None:
            hdrs.update(user.auth)
        payload = data if data is not None else (orjson.dumps(body) if body is not None else None)
        if payload is not None:
            hdrs.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=payload, headers=hdrs) as resp:
            text = await resp.text()
            self.texts.append(text + "\n" + "\n".join(f"{k}: {v}" for k, v in resp.headers.items()))
            try:
                parsed = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                parsed = None
            reply = Reply(resp.status, parsed, text, resp.headers)
        if expect is not None:
            assert reply.status == expect, f"{method} {path} -> {reply.status} {reply.text[:500]}"
        return reply

    async def v1(self, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.call(method, "/api/v1" + path, body, **kw)

    async def user(self, name: str = "Trader") -> User:
        email = f"{name.lower()}-{uuid.uuid4().hex[:8]}@example.com"
        created = await self.v1("POST", "/auth/register", {"email": email, "password": PASSWORD, "name": name},
                                expect=201)
        login = await self.v1("POST", "/auth/login", {"email": email, "password": PASSWORD}, expect=200)
        return User(id=created.body["id"], email=email, token=login.body["access_token"])

    async def connected_user(self, name: str = "Trader") -> User:
        user = await self.user(name)
        await self.connect(user)
        return user

    async def connect(self, user: User) -> dict[str, str]:
        account = self.sim.create_account(user_name=user.email)
        user.broker = account
        await self.v1("POST", "/broker/connect", {k: account[k] for k in ("api_key", "api_secret", "access_token")},
                      user=user, expect=200)
        return account

    async def strategy(self, user: User, **fields: Any) -> dict[str, Any]:
        body = {"symbol": "INFY", "buy_time": clock(3600), "sell_time": clock(7200), "stop_loss": 1400.5,
                "quantity": 10} | fields
        return (await self.v1("POST", "/strategies", body, user=user, expect=201)).body


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Capture every log line the API writes (JSON, through the redacting processor)."""
    buffer = io.StringIO()
    configure_logging("DEBUG", "json", stream=buffer)
    yield buffer


@pytest.fixture
async def api_factory(redis: Any, clean_db: str, redis_url: str, sim: Any,
                      logs: io.StringIO) -> AsyncIterator[Callable[..., Awaitable[ApiHarness]]]:
    """Build API apps with setting overrides, on clean Redis, Postgres and simulator."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> ApiHarness:
            overrides.setdefault("redis_url", redis_url)
            settings = make_settings(overrides.pop("redis_url"), clean_db, sim.base_url, **overrides)
            server = await stack.enter_async_context(TestServer(build_app(settings)))
            client = await stack.enter_async_context(TestClient(server))
            return ApiHarness(client, server.app, sim)

        yield make


@pytest.fixture
async def api(api_factory: Callable[..., Awaitable[ApiHarness]]) -> ApiHarness:
    """The API app on a test server, with clean Redis, Postgres and simulator."""
    return await api_factory()


@contextmanager
def run_api_process(env: dict[str, str], port: int | None = None) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """Run `python -m services.api` with env; yield (process, base URL, log path) once /readyz is 200."""
    port = port or free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tickwise-api-{port}.log"
    full_env = {**os.environ, **env, "TICKWISE_HEALTH_PORT": str(port), "PYTHONPATH": str(REPO_ROOT)}
    with running_service("services.api", full_env, port, log_path) as service:
        yield service.proc, service.base_url, log_path
