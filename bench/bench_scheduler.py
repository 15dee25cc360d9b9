"""Benchmark the scheduler burst: 10k strategies with the same buy_time.

Run: `python -m bench.bench_scheduler`. Prints one JSON line per figure and
writes `bench/out/scheduler.png`; numbers are reported, never asserted.

10,000 BUY events (canonical JSON, as load_run writes them) are put in
`schedule` with one due score, on a whole second 3 s ahead, then real
scheduler subprocesses (1, then 2 replicas) move them. Figures come from the
stream itself: an entry id's millisecond part is when Redis XADDed it, so
`last entry - due` is the time from the second to the last event on the
stream, and `entry - due` per event is its lateness.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import matplotlib
import orjson
from redis.asyncio import Redis

from deploy.local.procs import RedisServer, free_port
from libs.schema import keys
from libs.schema.migrate import upgrade_head
from libs.schema.models import BuyEvent, event_to_json
from tests.support.postgres import running_postgres

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend must be chosen first

ROOT = Path(__file__).resolve().parents[1]
OUT_PNG = ROOT / "bench" / "out" / "scheduler.png"
EVENTS = 10_000


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    """Print one figure as a JSON line."""
    print(orjson.dumps({"bench": "scheduler", "metric": metric, "value": round(value, 3), "unit": unit,
                        **params}).decode(), flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_scheduler(redis_url: str, database_url: str, log_dir: Path) -> subprocess.Popen[bytes]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "DATABASE_URL": database_url,
           "TICKWISE_HEALTH_PORT": str(port), "TICKWISE_MARKET_CALENDAR": "always_open",
           "TICKWISE_LOG_LEVEL": "WARNING"}
    log = (log_dir / f"scheduler-{port}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "services.scheduler"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


async def burst(redis: Redis, replicas: int) -> list[float]:
    """Schedule the burst and return each event's lateness in ms."""
    await redis.delete(keys.SCHEDULE, keys.ORDERS_STREAM)
    due_ms = (int(time.time()) + 3) * 1000
    moment = datetime.fromtimestamp(due_ms / 1000, UTC)
    members = {event_to_json(BuyEvent(strategy_id=uuid.uuid4(), run_id=f"{moment.isoformat()}-{i}",
                                      trading_day=date.today(), trigger_time=moment)): due_ms
               for i in range(EVENTS)}
    items = list(members.items())
    for start in range(0, len(items), 2000):
        await redis.zadd(keys.SCHEDULE, dict(items[start:start + 2000]))
    deadline = time.monotonic() + 30
    for _ in range(600):  # poll the stream length, at most 30 s
        if await redis.xlen(keys.ORDERS_STREAM) >= EVENTS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    ids = [msg_id for msg_id, _ in await redis.xrange(keys.ORDERS_STREAM)]
    return [int(i.split(b"-")[0]) - due_ms for i in ids]


async def run() -> None:
    OUT_PNG.parent.mkdir(parents=True, exist_ok=True)
    curves: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_scheduler_") as tmp, running_postgres(Path(tmp)) as db_url:
        upgrade_head(db_url)
        server = RedisServer(Path(tmp) / "redis", free_port())
        server.start(appendonly=False)
        redis = Redis(port=server.port)
        try:
            for replicas in (1, 2):
                procs = [start_scheduler(server.url, db_url, Path(tmp)) for _ in range(replicas)]
                try:
                    await asyncio.sleep(2.0)  # started and past their first rebuild
                    lateness = await burst(redis, replicas)
                finally:
                    for proc in procs:
                        proc.terminate()
                    for proc in procs:
                        proc.wait(timeout=15)
                curves[replicas] = lateness
                params = {"events": EVENTS, "replicas": replicas, "moved": len(lateness),
                          "duplicates": len(lateness) - EVENTS if len(lateness) > EVENTS else 0}
                emit("burst_due_to_last_event", max(lateness), "ms", **params)
                emit("burst_lateness_p50", pct(lateness, 0.50), "ms", **params)
                emit("burst_lateness_p99", pct(lateness, 0.99), "ms", **params)
                emit("burst_first_event_lateness", min(lateness), "ms", **params)
        finally:
            await redis.aclose()
            server.stop()
    plot(curves)


def plot(curves: dict[int, list[float]]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for replicas, lateness in curves.items():
        ordered = sorted(lateness)
        ax.plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=f"{replicas} scheduler(s)")
    ax.axvline(100, color="grey", linestyle="--", linewidth=0.8, label="target: last event < 100 ms")
    ax.set_xlabel("lateness: due second -> XADD on queue:orders (ms)")
    ax.set_ylabel("fraction of 10k events")
    ax.set_title("Scheduler burst: 10k BUYs due at the same second")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=110)


if __name__ == "__main__":
    asyncio.run(run())
