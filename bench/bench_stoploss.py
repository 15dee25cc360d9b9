"""Benchmark stop-loss reaction: a crossing tick at the simulator -> STOPLOSS on queue:orders.

Run: `python -m bench.bench_stoploss`. Prints one JSON line per figure and
writes `bench/out/stoploss.png`; numbers are reported, never asserted.

Set-up per scenario: N running strategies, all `bought`, over every symbol the
simulator lists (stops 10-20 % below the base price, distinct per symbol), a
real market listener subprocess on a private Redis, and background ticks at
R ticks/s pushed through POST /sim/ticks (prices within 3 % of base, so they
never cross). A probe then pushes one tick at the highest remaining stop of a
symbol, which crosses exactly one strategy, and times it from just before the
POST to the STOPLOSS entry read back with XREAD BLOCK on a dedicated
connection. That span contains the admin HTTP request, the simulator's frame
push, KiteTicker parsing, the listener and the marker+XADD script, plus one
Redis read. A bare loopback Redis round trip and a bare HTTP round trip to the
simulator are measured in the same run and printed with their ratios.
"""

from __future__ import annotations

import asyncio
import csv
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from datetime import time as clock_time
from pathlib import Path
from typing import Any

import aiohttp
import matplotlib
import orjson
from redis.asyncio import Redis

from deploy.local.procs import RedisServer, free_port
from libs.schema import keys
from libs.schema.models import StrategyConfig
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import load_run, plan_run, run_id_for
from tests.support.kite_sim import SimAdmin, run_sim, ws_root

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

ROOT = Path(__file__).resolve().parents[1]
OUT_PNG = ROOT / "bench" / "out" / "stoploss.png"
DATA = ROOT / "services" / "kite_sim" / "data" / "nse_equities.csv"
PROBES = 150
SCENARIOS = tuple((int(a), int(b)) for a, b in (s.split(":") for s in os.environ.get("BENCH_SCENARIOS", "1000:1000,1000:5000,10000:1000,10000:5000").split(",")))
CALENDAR = MarketCalendar("always_open")


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    """Print one figure as a JSON line."""
    print(orjson.dumps({"bench": "stoploss", "metric": metric, "value": round(value, 4), "unit": unit,
                        **params}).decode(), flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def instruments(limit: int = 500) -> list[tuple[str, float]]:
    with DATA.open() as f:
        rows = [(r["tradingsymbol"], float(r["last_price"])) for r in csv.DictReader(f)
                if r["segment"] == "NSE" and float(r["last_price"]) >= 50]
    return rows[:limit]


async def load_strategies(redis: Redis, n: int, symbols: list[tuple[str, float]]) -> dict[str, list]:
    """Load n bought runs; return per symbol its (stop, strategy_id) sorted by stop ascending."""
    started = datetime.now(UTC)
    per_symbol: dict[str, list] = {s: [] for s, _ in symbols}
    counts = {s: 0 for s, _ in symbols}
    for i in range(n):
        symbol, base = symbols[i % len(symbols)]
        counts[symbol] += 1
    user = "00000000-0000-4000-8000-000000000001"
    for i in range(n):
        symbol, base = symbols[i % len(symbols)]
        rank = i // len(symbols)
        # Distinct stops on a 0.05 grid between 80 % and 90 % of base.
        step = max(0.05, round(base * 0.10 / max(1, counts[symbol]) / 0.05) * 0.05)
        stop = round(round(base * 0.80 / 0.05) * 0.05 + rank * step, 2)
        sid = f"{i:08d}-0000-4000-8000-{i:012d}"
        config = StrategyConfig(strategy_id=sid, user_id=user, symbol=symbol, buy_time=clock_time(9, 30),
                                sell_time=clock_time(15, 0), stop_loss=stop, quantity=1, status="running",
                                run_id=run_id_for(started))
        await load_run(redis, config, plan_run(config, CALENDAR, started))
        per_symbol[symbol].append((stop, str(config.strategy_id)))
    async with redis.pipeline(transaction=False) as pipe:
        for entries in per_symbol.values():
            for _, sid in entries:
                pipe.hset(keys.runtime_key(sid), "position", "bought")
        await pipe.execute()
    await redis.delete(keys.SCHEDULE)  # no BUY/SELL may fire during the run
    for entries in per_symbol.values():
        entries.sort()
    return per_symbol


def start_listener(redis_url: str, sim_url: str, account: dict[str, str], log_dir: Path) -> tuple[Any, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "TICKWISE_HEALTH_PORT": str(port),
           "TICKWISE_MARKET_CALENDAR": "always_open", "TICKWISE_KITE_ROOT": sim_url,
           "TICKWISE_KITE_WS_ROOT": ws_root(sim_url), "TICKWISE_MARKET_DATA_API_KEY": account["api_key"],
           "TICKWISE_MARKET_DATA_ACCESS_TOKEN": account["access_token"], "TICKWISE_LOG_LEVEL": "WARNING",
           # Prices move only when the bench pushes them, so a quiet feed is expected here.
           "TICKWISE_WATCHDOG_SILENCE_S": "3600"}
    log = (log_dir / f"listener-{port}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.market_listener"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, port


async def wait_health(session: aiohttp.ClientSession, port: int, watched: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                body = await resp.json()
                if body.get("watched") == watched and body.get("feed") == "connected":
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("listener not ready")


async def background_ticks(session: aiohttp.ClientSession, sim_url: str, symbols: list[tuple[str, float]],
                           rate: int, stop: asyncio.Event, sent: list[int]) -> None:
    rng = random.Random(7)
    period = 0.01
    per_post = max(1, rate // 100)
    next_at = time.perf_counter()
    while not stop.is_set():
        body = [{"symbol": s, "last_price": round(b * rng.uniform(0.97, 1.03), 2)}
                for s, b in rng.choices(symbols, k=per_post)]
        async with session.post(f"{sim_url}/sim/ticks", data=orjson.dumps(body)) as resp:
            await resp.read()
        sent[0] += per_post
        next_at += period
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


async def follow_stoplosses(redis: Redis, arrivals: dict[str, asyncio.Future]) -> None:
    last = "$"
    while True:
        reply = await redis.xread({keys.ORDERS_STREAM: last}, block=1000, count=100)
        now = time.perf_counter()
        for _, entries in reply or ():
            for msg_id, fields in entries:
                last = msg_id
                sid = orjson.loads(fields[b"event"])["strategy_id"]
                fut = arrivals.get(sid)
                if fut is not None and not fut.done():
                    fut.set_result(now)


async def round_trips(redis: Redis, session: aiohttp.ClientSession, sim_url: str) -> tuple[float, float]:
    redis_rtt, http_rtt = [], []
    for _ in range(1000):
        t = time.perf_counter()
        await redis.ping()
        redis_rtt.append(time.perf_counter() - t)
    for _ in range(300):
        t = time.perf_counter()
        async with session.get(f"{sim_url}/healthz") as resp:
            await resp.read()
        http_rtt.append(time.perf_counter() - t)
    return statistics.median(redis_rtt) * 1000, statistics.median(http_rtt) * 1000


async def scenario(redis: Redis, session: aiohttp.ClientSession, sim_url: str, admin: SimAdmin, n: int,
                   rate: int, symbols: list[tuple[str, float]], log_dir: Path) -> dict[str, Any]:
    await redis.flushall()
    admin.reset()  # prices back to base: a stop left crossed by the last scenario would fire at subscribe
    per_symbol = await load_strategies(redis, n, symbols)
    redis_url = f"redis://127.0.0.1:{redis.connection_pool.connection_kwargs['port']}/0"
    proc, port = start_listener(redis_url, sim_url, admin.create_account("market-data"), log_dir)
    try:
        await wait_health(session, port, n)
        stop, sent = asyncio.Event(), [0]
        ticker = asyncio.create_task(background_ticks(session, sim_url, symbols, rate, stop, sent))
        arrivals: dict[str, asyncio.Future] = {}
        reader_client = Redis(port=redis.connection_pool.connection_kwargs["port"])
        reader = asyncio.create_task(follow_stoplosses(reader_client, arrivals))
        await asyncio.sleep(1.0)  # background load settles
        latencies, missed = [], 0
        began, sent_before = time.perf_counter(), sent[0]
        order = [s for s, _ in symbols]
        for i in range(PROBES):
            symbol = order[i % len(order)]
            stop_loss, sid = per_symbol[symbol].pop()
            fut = arrivals[sid] = asyncio.get_running_loop().create_future()
            t0 = time.perf_counter()
            async with session.post(f"{sim_url}/sim/ticks",
                                    data=orjson.dumps([{"symbol": symbol, "last_price": stop_loss}])) as resp:
                await resp.read()
            try:
                latencies.append((await asyncio.wait_for(fut, 2.0) - t0) * 1000)
            except TimeoutError:
                missed += 1
            await asyncio.sleep(0.01)
        achieved = (sent[0] - sent_before) / (time.perf_counter() - began)
        stop.set()
        await ticker
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await reader_client.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    return {"strategies": n, "symbols": len(symbols), "ticks_per_s": rate, "achieved_ticks_per_s": round(achieved),
            "p50": pct(latencies, 0.50), "p99": pct(latencies, 0.99), "samples": len(latencies), "missed": missed}


async def run() -> None:
    OUT_PNG.parent.mkdir(parents=True, exist_ok=True)
    symbols = instruments()
    with tempfile.TemporaryDirectory(prefix="bench_stoploss_") as tmp, run_sim(tick_interval_ms=0) as sim_url:
        server = RedisServer(Path(tmp) / "redis", free_port())
        server.start(appendonly=False)
        redis = Redis(port=server.port)
        results = []
        try:
            async with aiohttp.ClientSession() as session:
                redis_rtt, http_rtt = await round_trips(redis, session, sim_url)
                emit("redis_round_trip_p50", redis_rtt, "ms")
                emit("http_round_trip_p50", http_rtt, "ms")
                admin = SimAdmin(sim_url)
                for n, rate in SCENARIOS:
                    r = await scenario(redis, session, sim_url, admin, n, rate, symbols, Path(tmp))
                    results.append(r)
                    params = {k: r[k] for k in ("strategies", "symbols", "ticks_per_s", "achieved_ticks_per_s",
                                                "samples", "missed")}
                    emit("tick_to_stoploss_p50", r["p50"], "ms", **params,
                         ratio_to_redis_rtt=round(r["p50"] / redis_rtt, 1),
                         ratio_to_http_rtt=round(r["p50"] / http_rtt, 1))
                    emit("tick_to_stoploss_p99", r["p99"], "ms", **params)
        finally:
            await redis.aclose()
            server.stop()
    plot(results, redis_rtt, http_rtt)


def plot(results: list[dict[str, Any]], redis_rtt: float, http_rtt: float) -> None:
    labels = [f"{r['strategies'] // 1000}k strat\n{r['ticks_per_s'] // 1000}k ticks/s" for r in results]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar([i - 0.2 for i in x], [r["p50"] for r in results], width=0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [r["p99"] for r in results], width=0.4, label="p99")
    ax.axhline(redis_rtt, color="green", linestyle=":", label=f"bare Redis RTT {redis_rtt:.2f} ms")
    ax.axhline(http_rtt, color="purple", linestyle=":", label=f"bare HTTP RTT {http_rtt:.2f} ms")
    ax.axhline(2, color="grey", linestyle="--", linewidth=0.8, label="p50 target 2 ms")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ms (POST crossing tick -> STOPLOSS on queue:orders)")
    ax.set_title("Stop-loss reaction (listener path)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=110)


if __name__ == "__main__":
    asyncio.run(run())
