"""End-to-end harness: the real local stack in a temp dir, driven like a user would.

`Stack` wraps `deploy.local.stack.LocalStack` (the same code as `make up`), so
the e2e and fault suites test the product's own start-up path. `Trader` talks
only to the public HTTP API and the simulator's `/sim/*` admin API.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from deploy.local.procs import pid_alive
from deploy.local.stack import LocalStack
from libs.trading.calendar import IST
from tests.support.postgres import open_to_postgres


class Stack:
    """A private stack under `run_dir`: Redis, Postgres, simulator, API, pipeline services."""

    def __init__(self, run_dir: Path, replicas: dict[str, int] | None = None) -> None:
        # One replica of each pipeline service unless asked: tests add replicas where they matter.
        self.local = LocalStack(run_dir, replicas=replicas or {"executor": 1, "scheduler": 1, "market_listener": 1})
        self.env: dict[str, str] = {}

    def up(self) -> Stack:
        self.env = self.local.up()
        return self

    def down(self) -> None:
        self.local.down()

    @property
    def api_url(self) -> str:
        return self.env["API_URL"]

    @property
    def sim_url(self) -> str:
        return self.env["SIM_URL"]

    @property
    def redis_url(self) -> str:
        return self.env["REDIS_URL"]

    def add_replica(self, service: str, env: dict[str, str] | None = None) -> str:
        """Start one more instance of a pipeline service under the supervisor, with `env` on top of the
        stack's; return its program name."""
        return self.local.add_replica(service, env)

    def pid(self, instance: str) -> int:
        pid = self.local.pid_of(instance)
        assert pid is not None and pid_alive(pid), f"{instance} is not running"
        return pid

    def kill(self, instance: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process (the supervisor restarts it after a crash)."""
        os.kill(self.pid(instance), sig)

    def stop(self, service: str) -> None:
        """Stop every replica of a service through the supervisor (no restart until `restart`)."""
        for name in self.local.instances(service) or [service]:
            self.local.stop_program(name)

    def restart(self, service: str) -> None:
        """Start a stopped service again (all of its replicas), under its own names and ports."""
        self.env = self.local.up()  # up() starts whatever of the stack is down
        self.pid(service)

    def log(self, instance: str) -> str:
        name = self.local.instances(instance)[0] if self.local.instances(instance) else instance
        return (self.local.logs / f"{name}.log").read_text(errors="replace")


@contextmanager
def running_stack(run_dir: Path, env: Mapping[str, str], replicas: tuple[str, ...] = ()) -> Iterator[Stack]:
    """Run a stack whose every process gets `env` on top of the stack's own; stop it after."""
    open_to_postgres(run_dir)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)  # the stack hands its environment to every process it starts
        stack = Stack(run_dir)
        try:
            stack.up()
            for service in replicas:
                stack.add_replica(service)
            yield stack
        finally:
            stack.down()


def ist_clock(offset_s: float) -> str:
    """Return IST wall-clock HH:MM:SS `offset_s` from now (strategy times are IST)."""
    return (datetime.now(IST) + timedelta(seconds=offset_s)).strftime("%H:%M:%S")


class ApiError(AssertionError):
    pass


class Trader:
    """One user of the product: public API calls only."""

    def __init__(self, session: aiohttp.ClientSession, stack: Stack) -> None:
        self.session, self.stack = session, stack
        self.token = ""
        self.account: dict[str, str] = {}

    async def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.session.request(method, f"{self.stack.api_url}/api/v1{path}", json=body,
                                        headers=headers) as resp:
            data = await resp.json(content_type=None) if resp.status != 204 else None
            if resp.status != expect:
                raise ApiError(f"{method} {path} -> {resp.status} (wanted {expect}): {data}")
            return data

    async def sim(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, f"{self.stack.sim_url}/sim/{path}", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def sign_up(self) -> Trader:
        """Register, log in, create a paper account and connect it."""
        email = f"trader-{uuid4().hex[:10]}@example.com"
        await self.call("POST", "/auth/register", {"email": email, "password": "pass-word-123", "name": "T"},
                        expect=201)
        self.token = (await self.call("POST", "/auth/login", {"email": email, "password": "pass-word-123"}))[
            "access_token"]
        self.account = await self.sim("POST", "accounts", {"user_name": email})
        connected = await self.call("POST", "/broker/connect",
                                    {k: self.account[k] for k in ("api_key", "api_secret", "access_token")})
        assert connected["is_valid"] is True
        return self

    async def strategy(self, symbol: str, buy_in_s: float, sell_in_s: float, stop_loss: float,
                       quantity: int = 1, start: bool = True) -> str:
        created = await self.call("POST", "/strategies", {
            "symbol": symbol, "buy_time": ist_clock(buy_in_s), "sell_time": ist_clock(sell_in_s),
            "stop_loss": stop_loss, "quantity": quantity}, expect=201)
        if start:
            await self.call("POST", "/strategies/start", {"strategy_id": created["id"]})
        return created["id"]

    async def status(self, sid: str) -> dict[str, Any]:
        return await self.call("GET", f"/strategies/{sid}/status")

    async def strategy_row(self, sid: str) -> dict[str, Any]:
        return await self.call("GET", f"/strategies/{sid}")

    async def has_position(self, sid: str, position: str) -> bool:
        """Return whether the strategy's status shows `position` (a condition for `eventually`)."""
        return (await self.status(sid))["position"] == position

    async def has_status(self, sid: str, status: str) -> bool:
        """Return whether the strategy is `status` (a condition for `eventually`)."""
        return (await self.strategy_row(sid))["status"] == status

    async def logs(self, sid: str) -> list[dict[str, Any]]:
        data = await self.call("GET", f"/strategies/{sid}/orders")
        return data if isinstance(data, list) else data["items"]

    async def broker_orders(self, tag: str | None = None) -> list[dict[str, Any]]:
        """Every order the paper broker received for this trader's account."""
        query = f"orders?api_key={self.account['api_key']}" + (f"&tag={tag}" if tag else "")
        data = await self.sim("GET", query)
        return data if isinstance(data, list) else data.get("orders", data.get("items", []))

    async def tick(self, symbol: str, price: float) -> None:
        await self.sim("POST", "ticks", {"symbol": symbol, "last_price": price})

    async def tick_until_exited(self, sid: str, symbol: str, price: float) -> bool:
        """Send a crossing tick and return whether the run has exited (a condition for `eventually`).

        For a stop-loss after a restart: ticks are missed until the listener has
        re-indexed the run, and repeats are harmless (one STOPLOSS per run).
        """
        await self.tick(symbol, price)
        return await self.has_status(sid, "exited")
