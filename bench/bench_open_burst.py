"""Benchmark the open: 10k BUYs due at one second over 1k accounts, until the last is at the broker.

Run: `python -m bench.bench_open_burst`. Starts a private Redis, Postgres and
Kite simulator, opens 1,000 paper accounts and loads 10 runs on each (Kite's
per-account limit of 10 orders/s lets all of them through in the first
second), and puts every BUY in `schedule` due at the same whole second T0.
At T0 the scheduler's own move script (`services.scheduler.mover.DueMover`,
in this process) moves them to `queue:orders`, and executor subprocesses do
the rest, each BUY at the cost the delivery contract demands (a new run's
first BUY: place and order history, its order slot taken with the lock; the
runs are loaded as a start loads them). The simulator answers every REST call after the
latency set through `/sim/faults` (0 and 20 ms by default).

Prints one JSON line per figure: seconds from T0 to the last BUY accepted at
the broker (the simulator's `received_at`), the median, seconds until every
order_logs row is in Postgres, and CPU ms per order of each executor process
and of the simulator. Writes `bench/out/open_burst.png` (BUYs at the broker
over time). Never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib
import orjson
import psycopg
from redis.asyncio import Redis as AsyncRedis

from bench.bench_executor import (
    Stack,
    count_rows,
    cpu_seconds,
    executor_stack,
    load_runs,
    make_accounts,
    settle,
    sim_pid,
    start_executors,
    stop_executors,
)
from libs.schema import keys
from services.scheduler.mover import DueMover

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend must be chosen first

ROOT = Path(__file__).resolve().parents[1]
OUT_PNG = ROOT / "bench" / "out" / "open_burst.png"


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    """Print one figure as a JSON line."""
    print(orjson.dumps({"bench": "open_burst", "metric": metric, **params, "value": round(value, 3),
                        "unit": unit}).decode(), flush=True)


async def move_at(redis_url: str, due_s: int) -> float:
    """Sleep until `due_s` (epoch s), move every due event as the scheduler does; return seconds it took."""
    client = AsyncRedis.from_url(redis_url)
    mover = DueMover(client)
    try:
        await mover.redis.ping()
        await asyncio.sleep(max(0.0, due_s - time.time()))
        started = time.time()
        while await mover.move_all_due():
            pass
        return time.time() - started
    finally:
        await client.aclose()


def one_round(latency_ms: float, processes: int, strategies: int, accounts_n: int, stack: Stack, log_dir: Path,
              timeout_s: float) -> dict[str, Any]:
    r, sim, dsn = stack.redis, stack.sim, stack.dsn
    r.flushall()
    sim.reset()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE order_logs, strategies, broker_credentials, users CASCADE")
    procs = start_executors(processes, stack.env, r, log_dir)
    try:
        accounts = make_accounts(sim, stack.box, dsn, r, accounts_n)
        buys = load_runs(dsn, r, accounts, strategies)
        load_cpu = settle(procs)  # the runs start before the open: their owners are learned by then
        sim.set_faults(latency_ms=latency_ms)
        due_s = int(time.time()) + 2
        pipe = r.pipeline(transaction=False)
        for buy in buys:
            pipe.zadd(keys.SCHEDULE, {buy: due_s * 1000})
        pipe.execute()
        spid = sim_pid(sim.base_url)
        cpu_before = [cpu_seconds(p.pid) for p in procs], cpu_seconds(spid) if spid else 0.0
        move_s = asyncio.run(move_at(stack.redis_url, due_s))
        rows, deadline = 0, due_s + timeout_s
        while rows < strategies and time.time() < deadline:
            time.sleep(0.1)
            rows = count_rows(dsn)
        rows_s = time.time() - due_s
        cpu_after = [cpu_seconds(p.pid) for p in procs], cpu_seconds(spid) if spid else 0.0
        sim.set_faults()
        placed = sorted(o["received_at"] - due_s for o in sim.orders() if o.get("transaction_type", "BUY") == "BUY")
        return {"latency_ms": latency_ms, "processes": processes, "move_s": move_s, "rows": rows, "rows_s": rows_s,
                "placed": placed,
                "executor_cpu_ms": [1000 * (a - b) / max(rows, 1) for a, b in zip(cpu_after[0], cpu_before[0],
                                                                                   strict=True)],
                "sim_cpu_ms": 1000 * (cpu_after[1] - cpu_before[1]) / max(rows, 1),
                "load_cpu_ms_per_run": 1000 * load_cpu / max(strategies, 1)}
    finally:
        stop_executors(procs)


def report(result: dict[str, Any], strategies: int, accounts: int) -> None:
    params = {"latency_ms": result["latency_ms"], "processes": result["processes"], "strategies": strategies,
              "accounts": accounts}
    placed = result["placed"]
    emit("seconds_to_last_buy", placed[-1] if placed else float("nan"), "s", buys_at_broker=len(placed), **params)
    emit("seconds_to_first_buy", placed[0] if placed else float("nan"), "s", **params)
    emit("seconds_to_median_buy", statistics.median(placed) if placed else float("nan"), "s", **params)
    emit("seconds_to_all_rows", result["rows_s"], "s", rows=result["rows"], **params)
    emit("schedule_move_seconds", result["move_s"], "s", **params)
    for i, cpu in enumerate(result["executor_cpu_ms"]):
        emit("executor_cpu_ms_per_order", cpu * len(result["executor_cpu_ms"]), "ms", process=i,
             note="this process's CPU over the orders it handled, assuming an even share", **params)
    emit("executor_cpu_ms_per_order_total", sum(result["executor_cpu_ms"]), "ms", **params)
    emit("sim_cpu_ms_per_order", result["sim_cpu_ms"], "ms", **params)
    emit("executor_cpu_ms_per_run_loaded", result["load_cpu_ms_per_run"], "ms", **params,
         note="all executors' CPU after the runs were loaded, before the open (owner learning, credential warm-up)")


def plot(results: list[dict[str, Any]]) -> None:
    OUT_PNG.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        placed = result["placed"]
        ax.plot(placed, range(1, len(placed) + 1),
                label=f"{result['processes']} executors, broker latency {result['latency_ms']:g} ms")
    ax.axvline(5, color="#c33", linestyle="--", label="target 5 s")
    ax.set_xlabel("seconds after the due second")
    ax.set_ylabel("BUY orders accepted at the broker")
    ax.set_title(f"Open burst on {os.cpu_count()} cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_open_burst", description=__doc__)
    parser.add_argument("--strategies", type=int, default=10_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--latencies", default="0,20", help="simulator latency per call, ms (comma-separated)")
    parser.add_argument("--processes", default="2", help="executor processes (comma-separated)")
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the executors' logs here")
    args = parser.parse_args(argv)
    results = []
    with executor_stack("bench_open_burst_", os.environ.get("BENCH_LOG_LEVEL", "INFO")) as stack:
        for processes in [int(p) for p in args.processes.split(",")]:
            for latency in [float(x) for x in args.latencies.split(",")]:
                log_dir = args.log_dir or stack.tmpdir
                log_dir.mkdir(parents=True, exist_ok=True)
                result = one_round(latency, processes, args.strategies, args.accounts, stack, log_dir, args.timeout)
                report(result, args.strategies, args.accounts)
                results.append(result)
    plot(results)


if __name__ == "__main__":
    main()
