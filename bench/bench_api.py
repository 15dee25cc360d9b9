"""Benchmark the HTTP API: requests/s and p50/p99 latency of status reads and strategy creation.

Run: `python -m bench.bench_api`. Starts private Redis and Postgres, the Kite
simulator and `python -m services.api` as subprocesses, prepares users with
paper brokers and running strategies, then drives each workload for ~10 s with
concurrent aiohttp clients. Prints one JSON line per figure and writes
`bench/out/api.png`. Numbers are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import matplotlib
import orjson

from deploy.local.procs import free_port
from libs.schema.migrate import upgrade_head
from libs.service.secretbox import generate_key
from tests.support.kite_sim import SimAdmin, run_sim
from tests.support.postgres import running_postgres
from tests.support.redis import running_redis

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend must be chosen first

ROOT = Path(__file__).resolve().parents[1]
OUT_PNG = ROOT / "bench" / "out" / "api.png"


def emit(metric: str, value: float, unit: str) -> None:
    """Print one benchmark figure as a JSON line."""
    print(orjson.dumps({"bench": "api", "metric": metric, "value": round(value, 3), "unit": unit}).decode(),
          flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_api(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    full_env = {**os.environ, **env, "TICKWISE_HEALTH_PORT": str(port), "PYTHONPATH": str(ROOT)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=ROOT, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"api exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("api not ready")


async def prepare(session: aiohttp.ClientSession, base: str, admin: SimAdmin, users: int) -> list[dict[str, Any]]:
    """Register users, connect paper brokers, create and start one strategy each."""
    prepared = []
    for i in range(users):
        email, password = f"bench{i}-{random.randrange(10**9)}@example.com", "bench-password-1"
        async with session.post(f"{base}/api/v1/auth/register",
                                json={"email": email, "password": password, "name": f"Bench {i}"}) as r:
            assert r.status == 201, await r.text()
        async with session.post(f"{base}/api/v1/auth/login", json={"email": email, "password": password}) as r:
            headers = {"Authorization": "Bearer " + (await r.json())["access_token"]}
        account = admin.create_account(user_name=f"bench {i}")
        async with session.post(f"{base}/api/v1/broker/connect", headers=headers,
                                json={k: account[k] for k in ("api_key", "api_secret", "access_token")}) as r:
            assert r.status == 200, await r.text()
        async with session.post(f"{base}/api/v1/strategies", headers=headers, json=strategy_body()) as r:
            strategy = await r.json()
        async with session.post(f"{base}/api/v1/strategies/start", headers=headers,
                                json={"strategy_id": strategy["id"]}) as r:
            assert r.status == 200, await r.text()
        prepared.append({"headers": headers, "strategy_id": strategy["id"]})
    return prepared


def strategy_body() -> dict[str, Any]:
    return {"symbol": random.choice(["INFY", "TCS", "RELIANCE", "HDFCBANK"]), "buy_time": "23:00:00",
            "sell_time": "23:30:00", "stop_loss": 100.5, "quantity": 1}


async def drive(concurrency: int, seconds: float, one: Callable[[], Awaitable[int]]) -> tuple[list[float], int, float]:
    """Run `one` from `concurrency` workers for `seconds`; return latencies (s), errors and elapsed."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            status = await one()
            latencies.append(time.perf_counter() - started)
            if status >= 400:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


async def run(base: str, admin: SimAdmin, args: argparse.Namespace) -> dict[str, list[float]]:
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        users = await prepare(session, base, admin, args.users)

        async def status_read() -> int:
            user = random.choice(users)
            async with session.get(f"{base}/api/v1/strategies/{user['strategy_id']}/status",
                                   headers=user["headers"]) as r:
                await r.read()
                return r.status

        async def create() -> int:
            user = random.choice(users)
            async with session.post(f"{base}/api/v1/strategies", headers=user["headers"],
                                    json=strategy_body()) as r:
                await r.read()
                return r.status

        results = {}
        for name, one in (("status", status_read), ("create", create)):
            latencies, errors, elapsed = await drive(args.concurrency, args.seconds, one)
            results[name] = latencies
            emit(f"{name}_rps", len(latencies) / elapsed, "1/s")
            emit(f"{name}_p50_ms", percentile(latencies, 0.50) * 1000, "ms")
            emit(f"{name}_p99_ms", percentile(latencies, 0.99) * 1000, "ms")
            emit(f"{name}_errors", errors, "count")
        return results


def plot(results: dict[str, list[float]], concurrency: int) -> None:
    OUT_PNG.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, latencies in results.items():
        ms = sorted(v * 1000 for v in latencies)
        if ms:
            ax.plot(ms, [i / len(ms) for i in range(len(ms))],
                    label=f"{name} (p50 {statistics.median(ms):.1f} ms, n={len(ms)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Tickwise API latency CDF, {concurrency} concurrent clients")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_api", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each workload")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--users", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tickwise-bench-api-") as tmp:
        os.chmod(tmp, 0o755)
        with running_redis(Path(tmp) / "redis") as redis_url, running_postgres(Path(tmp) / "pg") as pg_url, \
                run_sim(tick_interval_ms=0) as sim_url:
            upgrade_head(pg_url)
            env = {"REDIS_URL": redis_url, "DATABASE_URL": pg_url, "TICKWISE_SECRET_KEY": generate_key(),
                   "TICKWISE_MARKET_CALENDAR": "always_open", "TICKWISE_KITE_ROOT": sim_url,
                   "TICKWISE_LOG_FORMAT": "json"}
            proc, base = start_api(env, Path(tmp) / "api.log")
            try:
                results = asyncio.run(run(base, SimAdmin(sim_url), args))
            finally:
                proc.terminate()
                proc.wait(timeout=15)
    plot(results, args.concurrency)
    print(f"# plot: {OUT_PNG}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
