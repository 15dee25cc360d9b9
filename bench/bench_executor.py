"""Benchmark executor throughput end to end: stream -> broker (simulator) -> order_logs row in Postgres.

Run: `python -m bench.bench_executor`. Starts a private Redis, Postgres and
Kite simulator, opens many paper accounts (each keeps far below Kite's 10
orders/s, so the figure is the executor's, not the rate limit's), loads one
run per strategy, then for 1 and several executor subprocesses XADDs a burst
of BUY events and times until every order_logs row is committed in Postgres.
The runs are loaded as a start loads them, so each BUY costs two broker calls
(place, order history) and takes its order slot with its lock, as the delivery
contract allows a new run's first entry. The BUYs go in once the executors are
idle again after the load (in production runs start long before their BUY is
due): what the load cost them is printed on its own,
`executor_cpu_ms_per_run_loaded`. Prints JSON lines, writes `bench/out/executor.png`,
never asserts. Besides CPU per order it prints Redis commands per order (those
run inside scripts included), which the shared host's load does not blur;
BENCH_CMDSTATS=1 also prints them per command.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

import matplotlib
import orjson
import psycopg
import redis

from deploy.local.procs import RedisServer, free_port
from libs.broker.kite import api_key_fingerprint
from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.migrate import upgrade_head
from libs.schema.models import Position, RuntimeState, StrategyConfig, event_to_json
from libs.service.secretbox import SecretBox, generate_key
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import plan_run, run_id_for, started_message
from tests.support.kite_sim import SimAdmin, run_sim
from tests.support.postgres import start_postgres

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend must be chosen first

ROOT = Path(__file__).resolve().parents[1]
OUT_PNG = ROOT / "bench" / "out" / "executor.png"
SYMBOLS = ("INFY", "RELIANCE", "TCS", "HDFCBANK", "ICICIBANK", "SBIN", "ITC", "LT")


def emit(metric: str, value: float, **extra: Any) -> None:
    """Print one figure as a JSON line."""
    print(orjson.dumps({"bench": "executor", "metric": metric, **extra, "value": round(value, 3)}).decode(),
          flush=True)


def make_accounts(sim: SimAdmin, box: SecretBox, dsn: str, r: redis.Redis, count: int) -> list[dict[str, Any]]:
    """Open `count` simulator accounts and register their owners in Postgres and Redis."""
    accounts, users, creds = [], [], []
    pipe = r.pipeline(transaction=False)
    for _ in range(count):
        acct = sim.create_account(daily_order_cap=100_000)
        uid = uuid.uuid4()
        fp = api_key_fingerprint(acct["api_key"])
        enc = {c: box.encrypt(acct[c], f"broker_credentials:{uid}:{c}") for c in ("api_key", "api_secret",
                                                                                  "access_token")}
        users.append((uid, "Bench", f"{uid}@bench.example", "x"))
        creds.append((uid, enc["api_key"], enc["api_secret"], enc["access_token"], True, box.current_key_id,
                      acct["api_key"][-4:], fp))
        pipe.hset(keys.broker_credentials_key(uid), mapping={"api_key": enc["api_key"], "access_token":
                  enc["access_token"], "api_key_fp": fp, "is_valid": "1"})
        accounts.append({"user_id": uid, "fp": fp})
    pipe.execute()
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO users (id, name, email, password_hash) VALUES (%s, %s, %s, %s)", users)
        cur.executemany("INSERT INTO broker_credentials (user_id, api_key, api_secret, access_token, is_valid, "
                        "key_id, api_key_hint, api_key_fp) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", creds)
    return accounts


def load_runs(dsn: str, r: redis.Redis, accounts: list[dict[str, Any]], count: int) -> list[bytes]:
    """Insert `count` running strategies, load their runs into Redis; return their BUY events."""
    calendar = MarketCalendar("always_open")
    started_at = datetime.now(UTC)
    rows, buys = [], []
    pipe = r.pipeline(transaction=False)
    for i in range(count):
        account = accounts[i % len(accounts)]
        sid = uuid.uuid4()
        symbol = SYMBOLS[i % len(SYMBOLS)]
        rows.append((sid, account["user_id"], symbol, dtime(23, 59, 57), dtime(23, 59, 58), 1.0, 1, "running",
                     started_at))
        config = StrategyConfig(strategy_id=sid, user_id=account["user_id"], symbol=symbol, buy_time="23:59:57",
                                sell_time="23:59:58", stop_loss=1.0, quantity=1, status="running",
                                run_id=run_id_for(started_at), api_key_fp=account["fp"])
        plan = plan_run(config, calendar, started_at)
        # What libs.trading.runs.load_run writes for a start (new_run), pipelined for a fast setup.
        pipe.set(keys.strategy_key(sid), dumps(config))
        pipe.set(keys.entry_unsent_key(sid, config.run_id), "1", ex=keys.RUN_MARKER_TTL_S)
        pipe.hset(keys.runtime_key(sid), mapping=RuntimeState(position=Position.none).to_redis_hash())
        pipe.sadd(keys.symbol_strategies_key(symbol), str(sid))
        pipe.xadd(keys.CONTROL_STREAM, {"event": dumps(started_message(config))})
        buys.append(event_to_json(plan.buy))
    pipe.execute()
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO strategies (id, user_id, symbol, buy_time, sell_time, stop_loss, quantity, "
                        "status, started_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
    return buys


def settle(procs: list[subprocess.Popen[bytes]], *, quiet_share: float = 0.05, window_s: float = 0.3,
           limit_s: float = 60.0) -> float:
    """Wait until the executors are idle again after runs were loaded; return the CPU seconds they used meanwhile.

    Loading a run makes each executor learn its owner from the `started` message
    and warm that account's credentials: work done when a run starts (in
    production long before its BUY is due), not per order, so it is kept out of
    the order figures and reported on its own.
    """
    started = sum(cpu_seconds(p.pid) for p in procs)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(p.pid) for p in procs)
        time.sleep(window_s)
        if sum(cpu_seconds(p.pid) for p in procs) - before <= quiet_share * window_s * len(procs):
            break
    return sum(cpu_seconds(p.pid) for p in procs) - started


def start_executors(n: int, env: dict[str, str], r: redis.Redis, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        proc_env = dict(env, TICKWISE_HEALTH_PORT=str(free_port()))
        with (log_dir / f"executor-{n}-{i}.log").open("wb") as log:
            # --profile: cProfile each executor; the stats land next to its log.
            prof = ["-m", "cProfile", "-o", str(log_dir / f"executor-{n}-{i}.prof")] if env.get("BENCH_PROFILE") else []
            procs.append(subprocess.Popen([sys.executable, *prof, "-m", "services.executor"], cwd=ROOT, env=proc_env,
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all("executor consuming" in (log_dir / f"executor-{n}-{i}.log").read_text() for i in range(n)):
            return procs
        time.sleep(0.05)
    logs = "\n".join((log_dir / f"executor-{n}-{i}.log").read_text()[-2000:] for i in range(n))
    raise RuntimeError(f"executors did not start consuming:\n{logs}")


def stop_executors(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds(pid: int) -> float:
    """Return user+system CPU seconds of a process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sim_pid(sim_url: str) -> int | None:
    """Find the simulator process by its port (run_sim does not expose it)."""
    port = sim_url.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"services.kite_sim" in args and port.encode() in args:
            return int(proc.name)
    return None


def redis_commands(r: redis.Redis) -> int:
    """Return how many commands Redis has run since it started (the INFO call itself included)."""
    return int(r.info("stats")["total_commands_processed"])


def count_rows(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM order_logs WHERE status = 'success'").fetchone()[0])


def one_round(processes: int, orders: int, accounts_n: int, env: dict[str, str], dsn: str, r: redis.Redis,
              sim: SimAdmin, box: SecretBox, log_dir: Path, timeout_s: float) -> dict[str, float]:
    r.flushall()
    sim.reset()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE order_logs, strategies, broker_credentials, users CASCADE")
    procs = start_executors(processes, env, r, log_dir)
    try:
        accounts = make_accounts(sim, box, dsn, r, accounts_n)
        buys = load_runs(dsn, r, accounts, orders)
        load_cpu = settle(procs)
        spid = sim_pid(sim.base_url)
        cpu_before = [cpu_seconds(p.pid) for p in procs], cpu_seconds(spid) if spid else 0.0
        commands_before = redis_commands(r)
        stats_before = r.info("commandstats") if os.environ.get("BENCH_CMDSTATS") else {}
        started = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for buy in buys:
            pipe.xadd(keys.ORDERS_STREAM, {"event": buy})
        pipe.execute()
        done, deadline = 0, started + timeout_s
        while done < orders and time.perf_counter() < deadline:
            time.sleep(0.05)
            done = count_rows(dsn)
        took = time.perf_counter() - started
        executor_cpu = sum(cpu_seconds(p.pid) for p in procs) - sum(cpu_before[0])
        sim_cpu = (cpu_seconds(spid) if spid else 0.0) - cpu_before[1]
        # Every command Redis ran meanwhile, less the benchmark's own XADDs: deterministic, unlike CPU
        # on a shared host (it includes the idle executors' heartbeats and blocked reads).
        commands = redis_commands(r) - commands_before - len(buys) - 1
        if stats_before:
            after = r.info("commandstats")
            print({k: round((v["calls"] - stats_before.get(k, {"calls": 0})["calls"]) / max(done, 1), 2)
                   for k, v in after.items() if v["calls"] != stats_before.get(k, {"calls": 0})["calls"]})
        placed = sim.orders()
        received = sorted(o["received_at_monotonic"] for o in placed)
        broker_span = (received[-1] - received[0]) if len(received) > 1 else 0.0
        return {"rows": done, "seconds": took, "orders_at_broker": len(placed),
                "executor_cpu_ms_per_order": 1000 * executor_cpu / max(done, 1),
                "sim_cpu_ms_per_order": 1000 * sim_cpu / max(done, 1),
                "redis_commands_per_order": commands / max(done, 1),
                "executor_cpu_ms_per_run_loaded": 1000 * load_cpu / max(len(buys), 1),
                "broker_orders_per_s": len(placed) / broker_span if broker_span else 0.0}
    finally:
        stop_executors(procs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_executor", description=__doc__)
    parser.add_argument("--orders", type=int, default=1500)
    parser.add_argument("--accounts", type=int, default=300)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--profile", type=Path, default=None, help="cProfile executors; copy stats here")
    args = parser.parse_args(argv)
    with executor_stack("bench_executor_", BENCH_PROFILE="1" if args.profile else "") as stack:
        results = []
        for processes in [int(p) for p in args.processes.split(",")]:
            result = one_round(processes, args.orders, args.accounts, stack.env, stack.dsn, stack.redis, stack.sim,
                               stack.box, stack.tmpdir, args.timeout)
            rate = result["rows"] / result["seconds"]
            results.append((processes, rate))
            emit("orders_per_s", rate, processes=processes, orders=args.orders, accounts=args.accounts,
                 rows=result["rows"], seconds=round(result["seconds"], 3), unit="orders/s")
            emit("broker_orders_per_s", result["broker_orders_per_s"], processes=processes, unit="orders/s")
            emit("executor_cpu_ms_per_order", result["executor_cpu_ms_per_order"], processes=processes, unit="ms")
            emit("sim_cpu_ms_per_order", result["sim_cpu_ms_per_order"], processes=processes, unit="ms")
            emit("redis_commands_per_order", result["redis_commands_per_order"], processes=processes,
                 unit="commands")
            emit("executor_cpu_ms_per_run_loaded", result["executor_cpu_ms_per_run_loaded"], processes=processes,
                 unit="ms", note="all executors' CPU after the runs were loaded, before any BUY (owner learning, "
                                 "credential warm-up), per run")
        plot(results)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for prof in stack.tmpdir.glob("*.prof"):
                prof.replace(args.profile / prof.name)


@dataclass
class Stack:
    """A private Redis, Postgres (migrated) and simulator, and the executors' environment for them."""

    tmpdir: Path
    redis_url: str
    dsn: str
    redis: redis.Redis
    sim: SimAdmin
    box: SecretBox
    env: dict[str, str]


@contextmanager
def executor_stack(prefix: str, log_level: str = "INFO", **extra_env: str) -> Iterator[Stack]:
    """Run Redis, Postgres and the simulator for a benchmark; yield them with the executor environment."""
    key = generate_key()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        tmpdir = Path(tmp)
        os.chmod(tmpdir, 0o755)
        redis_server = RedisServer(tmpdir / "redis", free_port())
        redis_server.start(appendonly=False)
        pg_url, pg_stop = start_postgres(tmpdir / "pg")
        try:
            upgrade_head(pg_url)
            with run_sim(tick_interval_ms=0, daily_order_cap=100_000, log_level="warning") as sim_url:
                env = dict(os.environ, PYTHONPATH=str(ROOT), TICKWISE_REDIS_URL=redis_server.url,
                           TICKWISE_DATABASE_URL=pg_url, TICKWISE_KITE_ROOT=sim_url, TICKWISE_SECRET_KEY=key,
                           TICKWISE_MARKET_CALENDAR="always_open", TICKWISE_LOG_LEVEL=log_level,
                           # Events are enqueued directly, long before the runs' 23:59 times.
                           TICKWISE_EVENT_EARLY_TOLERANCE_S="172800", **extra_env)
                yield Stack(tmpdir, redis_server.url, pg_url.replace("postgresql+psycopg://", "postgresql://"),
                            redis.Redis.from_url(redis_server.url), SimAdmin(sim_url, timeout=60),
                            SecretBox.from_b64(key), env)
        finally:
            pg_stop()
            redis_server.stop()


def plot(results: list[tuple[int, float]]) -> None:
    OUT_PNG.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([str(p) for p, _ in results], [v for _, v in results], color="#3a7")
    ax.axhline(2000, color="#c33", linestyle="--", label="target 2,000/s")
    ax.set_xlabel("executor processes")
    ax.set_ylabel("orders/s (stream -> broker -> Postgres)")
    ax.set_title(f"Executor throughput on {os.cpu_count()} cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=100)


if __name__ == "__main__":
    main()
