"""A Jepsen-style chaos campaign: a simulated trading day under a seeded nemesis.

    python -m tests.fault.chaos --seed 7 --minutes 2            # `make chaos` runs a longer one
    python -m tests.fault.chaos --seed 1 --minutes 25 --kills 200 --redis-crashes 10 --pg-outage-s 60

A private supervised stack (`deploy.local`, two replicas of every pipeline
service) trades for many users, one paper account each, through the public
API and the simulator only: strategies with buys and sells spread over the
window, some stopped out by a price drop pushed to the simulator, some
stopped by their user before their buy. Meanwhile the nemesis, reproducibly
from the seed, kill -9s executor, scheduler and listener replicas (the
supervisor restarts them), kill -9s Redis (AOF everysec; it comes back at
the same address), stops Postgres hard (`pg_ctl stop -m immediate`) for a
while, and injects broker faults through `/sim/faults` (5xx bursts,
accept-then-timeout, 429 bursts, latency spikes).

The checker then counts at the broker, per strategy (each strategy trades
its own symbol on its user's account): exactly one filled entry and one
filled exit (none for a run stopped before its buy), net position zero,
status `exited` (or `stopped`), and every order the broker saw has its row
in Postgres `order_logs`. One JSON line; exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
import psycopg

from deploy.local.stack import LocalStack
from libs.trading.calendar import IST

# Takeovers within seconds, and a retry budget that outlasts a fault burst (a burst is not an outage).
CAMPAIGN_ENV = {
    "TICKWISE_CLAIM_IDLE_MS": "4000",
    "TICKWISE_CLAIM_INTERVAL_S": "0.5",
    "TICKWISE_LOCK_TTL_MS": "4000",
    "TICKWISE_BROKER_TIMEOUT_S": "3",
    "TICKWISE_RETRY_BASE_S": "0.5",
    "TICKWISE_RETRY_CAP_S": "4",
    "TICKWISE_RETRY_MAX_ATTEMPTS": "12",
    "TICKWISE_WRITER_BACKOFF_MAX_S": "2",
    "TICKWISE_GRACE_S": "120",
}
PIPELINE = ("executor", "scheduler", "market_listener")
BROKER_FAULTS = {
    "broker_5xx": {"error_rate": 0.6},
    "broker_timeout": {"timeout_after_accept_rate": 0.5, "routes": ["orders"]},
    "broker_429": {"burst_429": 8},
    "broker_latency": {"latency_ms": 1500},
}


@dataclass
class Plan:
    """The campaign's size; every random choice comes from `seed`."""

    seed: int
    minutes: float
    users: int = 6
    strategies: int = 24
    kills: int = 8
    redis_crashes: int = 1
    pg_outages: int = 1
    pg_outage_s: float = 10.0
    broker_faults: int = 4
    stop_loss_share: float = 0.25
    user_stop_share: float = 0.1


@dataclass
class StrategyPlan:
    user: int
    symbol: str
    price: float
    buy_at: float  # seconds after the trading start
    sell_at: float
    stop_loss: float
    drop_at: float | None = None  # push a price under the stop then
    user_stop_at: float | None = None  # the user stops it before its buy
    strategy_id: str = ""
    stopped_by_user: bool = False


@dataclass
class Report:
    seed: int
    minutes: float
    users: int
    strategies: int
    kills: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    missing: int = 0
    open_positions: int = 0
    runs_not_exited: int = 0
    log_rows_missing: int = 0
    broker_orders: int = 0
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.missing or self.open_positions or self.runs_not_exited
                    or self.log_rows_missing)

    def json_line(self) -> str:
        data = asdict(self)
        data["problems"] = data["problems"][:20]
        return json.dumps({**data, "ok": self.ok}, sort_keys=False)


def _say(text: str) -> None:
    print(f"chaos {datetime.now(IST).strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def make_schedule(plan: Plan, symbols: list[tuple[str, float]]) -> tuple[list[StrategyPlan], list[tuple[float, str]]]:
    """Return the strategies and the nemesis events (time, kind), both drawn from the seed."""
    rng = random.Random(plan.seed)
    window = plan.minutes * 60
    pool = symbols[:]
    rng.shuffle(pool)
    sl_count = max(1, round(plan.strategies * plan.stop_loss_share))
    sl_symbols, shared = pool[:sl_count], pool[sl_count:sl_count + max(8, plan.strategies)]
    strategies: list[StrategyPlan] = []
    used: dict[int, set[str]] = {}
    for i in range(plan.strategies):
        user = i % plan.users
        buy_at = rng.uniform(15, max(20, window - 60))
        sell_at = buy_at + rng.uniform(15, max(16, min(90, window - buy_at - 10)))
        if i < sl_count:
            symbol, price = sl_symbols[i]
            drop_at = rng.uniform(buy_at + 3, sell_at - 3) if sell_at - buy_at > 8 else None
            stop = round(price * 0.97, 1)
        else:
            choices = [s for s in shared if s[0] not in used.get(user, set())]
            symbol, price = rng.choice(choices)
            drop_at, stop = None, round(price * 0.85, 1)  # far below: only the exit at sell_time
        used.setdefault(user, set()).add(symbol)
        sp = StrategyPlan(user, symbol, price, buy_at, sell_at, stop, drop_at)
        if i >= sl_count and rng.random() < plan.user_stop_share and buy_at > 25:
            sp.user_stop_at = buy_at - 10
        strategies.append(sp)
    events: list[tuple[float, str]] = []
    for _ in range(plan.kills):
        events.append((rng.uniform(5, window - 10), "kill:" + rng.choice(PIPELINE)))
    for _ in range(plan.redis_crashes):
        events.append((rng.uniform(10, window - 10), "redis"))
    for _ in range(plan.pg_outages):
        events.append((rng.uniform(10, max(11, window - plan.pg_outage_s - 10)), "postgres"))
    kinds = list(BROKER_FAULTS)
    for n in range(plan.broker_faults):
        events.append((rng.uniform(5, window - 10), kinds[n % len(kinds)] if n < len(kinds) else rng.choice(kinds)))
    return strategies, sorted(events)


class Campaign:
    """One run: a stack, users, strategies, a nemesis, a checker."""

    def __init__(self, plan: Plan, stack: LocalStack, env: dict[str, str], session: aiohttp.ClientSession) -> None:
        self.plan, self.stack, self.env, self.http = plan, stack, env, session
        self.rng = random.Random(plan.seed ^ 0xC4A05)
        self.users: list[dict[str, Any]] = []
        self.kills: Counter[str] = Counter()
        self.broker_lock = asyncio.Lock()

    # -- the public API and the simulator --------------------------------
    async def api(self, method: str, path: str, body: Any = None, token: str = "", expect: int = 200,
                  attempts: int = 60) -> Any:
        """Call the API, retrying while it is unavailable (a restart, an outage) or throttling."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        last = ""
        for _ in range(attempts):
            try:
                async with self.http.request(method, f"{self.env['API_URL']}/api/v1{path}", json=body,
                                             headers=headers) as resp:
                    data = await resp.json(content_type=None) if resp.status != 204 else None
                    if resp.status == expect:
                        return data
                    last = f"{resp.status} {data}"
                    if resp.status < 500 and resp.status != 429:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(1)
        raise RuntimeError(f"{method} {path}: {last}")

    async def sim(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, f"{self.env['SIM_URL']}/sim/{path}", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"sim {path}: {resp.status} {await resp.text()}")
            return await resp.json()

    async def symbols(self, account: dict[str, str]) -> list[tuple[str, float]]:
        headers = {"X-Kite-Version": "3", "Authorization": f"token {account['api_key']}:{account['access_token']}"}
        async with self.http.get(f"{self.env['SIM_URL']}/instruments/NSE", headers=headers) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"instruments: {resp.status} {text[:200]}")
        rows = csv.DictReader(io.StringIO(text))
        return [(r["tradingsymbol"], float(r["last_price"])) for r in rows if float(r["last_price"] or 0) >= 50]

    async def sign_up(self, n: int) -> dict[str, Any]:
        email = f"chaos-{self.plan.seed}-{n}-{uuid4().hex[:6]}@example.com"
        await self.api("POST", "/auth/register", {"email": email, "password": "chaos-pass-9271", "name": f"C{n}"},
                       expect=201)
        token = (await self.api("POST", "/auth/login", {"email": email, "password": "chaos-pass-9271"}))[
            "access_token"]
        account = await self.sim("POST", "accounts", {"user_name": email})
        await self.api("POST", "/broker/connect", {k: account[k] for k in ("api_key", "api_secret", "access_token")},
                       token=token)
        return {"email": email, "token": token, "account": account}

    # -- the day ------------------------------------------------------------
    async def run(self) -> Report:
        started = time.monotonic()
        plan = self.plan
        self.users = [await self.sign_up(n) for n in range(plan.users)]
        strategies, events = make_schedule(plan, await self.symbols(self.users[0]["account"]))
        await self.sim("POST", "ticks", [{"symbol": s.symbol, "last_price": s.price} for s in strategies])
        t0 = time.time() + 10 + 0.6 * plan.strategies  # creating and starting takes a moment
        for s in strategies:
            token = self.users[s.user]["token"]
            clock = [(datetime.fromtimestamp(t0 + at, IST)).strftime("%H:%M:%S") for at in (s.buy_at, s.sell_at)]
            created = await self.api("POST", "/strategies", {
                "symbol": s.symbol, "buy_time": clock[0], "sell_time": clock[1], "stop_loss": s.stop_loss,
                "quantity": 1 + s.user % 5}, token=token, expect=201)
            s.strategy_id = created["id"]
            await self.api("POST", "/strategies/start", {"strategy_id": s.strategy_id}, token=token)
        if time.time() > t0:
            raise RuntimeError("setting up took longer than planned; use fewer strategies")
        _say(f"seed={plan.seed}: {len(self.users)} users, {len(strategies)} strategies, {len(events)} nemesis "
             f"events over {plan.minutes:g} min")
        await asyncio.sleep(t0 - time.time())
        tasks = [asyncio.create_task(self._at(t0, at, self._nemesis(kind))) for at, kind in events]
        for s in strategies:
            if s.drop_at is not None:
                tasks.append(asyncio.create_task(self._at(t0, s.drop_at, self._drop(s))))
            if s.user_stop_at is not None:
                tasks.append(asyncio.create_task(self._at(t0, s.user_stop_at, self._user_stop(s, t0))))
        await asyncio.gather(*tasks)
        await self.sim("POST", "faults", {})
        self.stack.start_program("postgres")  # no-op unless an outage outlived the window
        report = await self.check(strategies, deadline=t0 + max(s.sell_at for s in strategies) + 150)
        report.elapsed_s = round(time.monotonic() - started, 1)
        return report

    async def _at(self, t0: float, at: float, action: Any) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.time()))
        try:
            await action
        except Exception as exc:  # noqa: BLE001 - a failed action is reported, the campaign goes on
            _say(f"action failed: {exc!r}")

    async def _drop(self, s: StrategyPlan) -> None:
        await self.sim("POST", "ticks", {"symbol": s.symbol, "last_price": round(s.stop_loss * 0.98, 1)})

    async def _user_stop(self, s: StrategyPlan, t0: float) -> None:
        token = self.users[s.user]["token"]
        while time.time() < t0 + s.buy_at - 2:
            try:
                await self.api("POST", "/strategies/stop", {"strategy_id": s.strategy_id}, token=token, attempts=1)
                s.stopped_by_user = True
                return
            except RuntimeError:
                await asyncio.sleep(0.5)

    async def _kill(self, name: str, kind: str) -> None:
        for _ in range(10):  # a process the supervisor is still restarting has no pid yet
            pid = await asyncio.to_thread(self.stack.pid_of, name)
            if pid:
                os.kill(pid, signal.SIGKILL)
                self.kills[kind] += 1
                return
            await asyncio.sleep(1)

    async def _nemesis(self, kind: str) -> None:
        if kind.startswith("kill:"):
            group = kind.split(":", 1)[1]
            await self._kill(self.rng.choice(self.stack.instances(group)), group)
        elif kind == "redis":
            await self._kill("redis", "redis")
        elif kind == "postgres":
            await asyncio.to_thread(self.stack.crash_postgres)
            self.kills["postgres"] += 1
            _say(f"postgres down for {self.plan.pg_outage_s:g}s")
            await asyncio.sleep(self.plan.pg_outage_s)
            await asyncio.to_thread(self.stack.start_program, "postgres")
        else:
            async with self.broker_lock:
                await self.sim("POST", "faults", BROKER_FAULTS[kind])
                self.kills[kind] += 1
                await asyncio.sleep(self.rng.uniform(1.5, 3.5))
                await self.sim("POST", "faults", {})

    # -- the checker ---------------------------------------------------------
    async def _statuses(self, strategies: list[StrategyPlan]) -> dict[str, str]:
        out = {}
        for s in strategies:
            row = await self.api("GET", f"/strategies/{s.strategy_id}", token=self.users[s.user]["token"])
            out[s.strategy_id] = row["status"]
        return out

    async def _orders(self) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for user in self.users:
            key = user["account"]["api_key"]
            data = await self.sim("GET", f"orders?api_key={key}")
            out[key] = data if isinstance(data, list) else data.get("orders", [])
        return out

    def _logged_order_ids(self) -> set[str]:
        dsn = self.env["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT broker_order_id FROM order_logs WHERE broker_order_id IS NOT NULL")
            return {r[0] for r in rows}

    async def check(self, strategies: list[StrategyPlan], deadline: float) -> Report:
        plan = self.plan
        report = Report(plan.seed, plan.minutes, plan.users, plan.strategies)

        def expected(s: StrategyPlan) -> str:
            return "stopped" if s.stopped_by_user else "exited"

        while True:  # wait for every run to end (retries and takeovers may need a while)
            statuses = await self._statuses(strategies)
            if all(statuses[s.strategy_id] == expected(s) for s in strategies) or time.time() > deadline:
                break
            await asyncio.sleep(2)
        await asyncio.sleep(2)  # a duplicate still in flight shows up now
        orders = await self._orders()
        broker_ids: set[str] = set()
        for s in strategies:
            mine = [o for o in orders[self.users[s.user]["account"]["api_key"]] if o["tradingsymbol"] == s.symbol]
            broker_ids |= {o["order_id"] for o in mine}
            sides = Counter(o["transaction_type"] for o in mine)
            filled = Counter(o["transaction_type"] for o in mine if o["status"] == "COMPLETE")
            qty = sum(o.get("filled_quantity", o["quantity"]) * (1 if o["transaction_type"] == "BUY" else -1)
                      for o in mine if o["status"] == "COMPLETE")
            dup = max(0, sides["BUY"] - 1) + max(0, sides["SELL"] - 1)
            want = (0, 0) if s.stopped_by_user else (1, 1)
            miss = max(0, want[0] - filled["BUY"]) + max(0, want[1] - filled["SELL"])
            status = statuses[s.strategy_id]
            report.duplicates += dup
            report.missing += miss
            report.open_positions += qty != 0
            report.runs_not_exited += status != expected(s)
            if dup or miss or qty or status != expected(s):
                report.problems.append(f"{s.strategy_id} {s.symbol} user={s.user} status={status} "
                                       f"orders={dict(sides)} filled={dict(filled)} net={qty}")
        report.broker_orders = len(broker_ids)
        for _ in range(30):  # the order-log writer catches up after an outage
            try:
                missing_rows = broker_ids - await asyncio.to_thread(self._logged_order_ids)
            except psycopg.Error:
                missing_rows = broker_ids
            if not missing_rows:
                break
            await asyncio.sleep(2)
        report.log_rows_missing = len(missing_rows)
        report.kills = dict(sorted(self.kills.items()))
        return report


def _wait_clear_of_midnight(plan: Plan) -> None:
    """Strategy times are IST wall-clock: a campaign must not straddle IST midnight."""
    now = datetime.now(IST)
    end = now + timedelta(minutes=plan.minutes + 3)
    if end.date() != now.date():
        wait = (now.replace(hour=23, minute=59, second=59) - now).total_seconds() + 3
        _say(f"waiting {wait:.0f}s for IST midnight to pass")
        time.sleep(wait)


async def run_campaign(plan: Plan, run_dir: Path | None = None, keep: bool = False) -> Report:
    """Start a private stack, run the campaign, stop the stack; return the report."""
    _wait_clear_of_midnight(plan)
    own_dir = run_dir is None
    base = Path(tempfile.mkdtemp(prefix="tickwise-chaos-")) if own_dir else run_dir
    os.chmod(base, 0o755)
    saved = {k: os.environ.get(k) for k in CAMPAIGN_ENV}
    os.environ.update(CAMPAIGN_ENV)  # supervisord hands its environment to every program
    stack = LocalStack(base / "run", replicas={"executor": 2, "scheduler": 2, "market_listener": 2})
    try:
        env = await asyncio.to_thread(stack.up)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            return await Campaign(plan, stack, env, session).run()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not keep:
            await asyncio.to_thread(stack.down)
            if own_dir:
                await asyncio.to_thread(stack.clean)
                shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fault.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--users", type=int)
    p.add_argument("--strategies", type=int)
    p.add_argument("--kills", type=int, help="kill -9s of pipeline replicas (default: 4 a minute)")
    p.add_argument("--redis-crashes", type=int)
    p.add_argument("--pg-outages", type=int, default=1)
    p.add_argument("--pg-outage-s", type=float)
    p.add_argument("--broker-faults", type=int)
    p.add_argument("--run-dir", type=Path, help="keep the stack here (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    a = p.parse_args(argv)
    m = a.minutes
    plan = Plan(
        seed=a.seed, minutes=m, users=a.users or max(4, min(40, round(3 * m))),
        strategies=a.strategies or max(16, min(160, round(12 * m))),
        kills=a.kills if a.kills is not None else max(4, round(4 * m)),
        redis_crashes=a.redis_crashes if a.redis_crashes is not None else max(1, round(m / 3)),
        pg_outages=a.pg_outages, pg_outage_s=a.pg_outage_s or min(60.0, max(8.0, m * 4)),
        broker_faults=a.broker_faults if a.broker_faults is not None else max(4, round(2 * m)),
    )
    try:
        report = asyncio.run(run_campaign(plan, a.run_dir, a.keep))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one readable line
        print(json.dumps({"seed": a.seed, "error": str(exc), "ok": False}))
        return 2
    print(report.json_line(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
