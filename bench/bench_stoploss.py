"""Benchmark stop-loss reaction: a crossing tick at the simulator -> STOPLOSS on queue:orders.

Run: `python -m bench.bench_stoploss`. Prints one JSON line per figure and
writes `bench/out/stoploss.png`; numbers are reported, never asserted.

Set-up per scenario: N running strategies, all `bought`, spread over 500 symbols
the simulator lists (stops 10-20 % below the base price, distinct per symbol), a
real market listener subprocess on a private Redis, and background ticks at
R ticks/s pushed through POST /sim/ticks (prices within 3 % of base, so they
never cross). A probe then pushes one tick at the highest remaining stop of a
symbol, which crosses exactly one strategy, and times it from just before the
POST to the STOPLOSS entry read back with XREAD BLOCK on a dedicated
connection. That span contains the admin HTTP request, the simulator's frame
push, KiteTicker parsing, the listener and the marker+XADD script, plus one
Redis read. When the executor is in the tree, the scenarios run again with a
real executor (and Postgres): the probed strategies belong to 20 paper
accounts and were bought at the simulator with their entry tags, and the
figure is from the POST to the simulator's `received_at` of the exit order
(GET /sim/orders?tag=, read after the probes: the next probe waits for the
executor's exit commit on `control:strategies`, not by polling the simulator,
which would load the process being timed). A bare loopback Redis round trip
and a bare HTTP round trip to the simulator are measured in the same run and
printed with ratios, and so is each scenario's floor, `tick_floor`: a tick
from just before its POST to a bare WebSocket client in this process having
it (timed on arrival), under the same background ticks (what no listener can
take away), and `tick_floor_process`: the same for a bare client in a process
of its own that does nothing else, as the listener's: on a shared VM that
process is asleep when the tick comes, and waking it costs more than the
whole in-process floor (~0.7 ms measured); every hop of the stop-loss path
(listener, Redis, executor, Redis, executor, simulator) can pay that wake-up.
`stoploss_breakdown_p50` splits the path per probe: `sim_to_listener` (POST ->
the listener saw the crossing tick: the event's trigger_time),
`listener_to_reader` (-> a blocked XREAD in this process has the STOPLOSS:
the marker+XADD script and the stream's wake-up) and, with the executor,
`reader_to_sell` (-> the simulator received the SELL: the executor's pickup,
lock, rate slot and order call); same-host wall clocks, each leg's median.
`listener_script` is the listener's own view (its tick-to-trigger histogram's
sum, read after each probe): the tick -> its script's reply back on its loop.
With BENCH_HANGING_WEBHOOKS=N set (even 0), the executor scenarios also run an
API process (it runs the notification deliverer, as in production) and give N
of the probed strategies' owners a webhook that never answers (a receiver in
its own process), so every exit's notice hangs: compare the tick-to-SELL
figures of N=0 and N=100 to see whether notifications delay trading.
The symbols are the first 500 NSE equities of the simulator's instruments list
priced at Rs 50 or more.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from datetime import time as clock_time
from pathlib import Path
from typing import Any

import aiohttp
import matplotlib
import orjson
from aiohttp import web
from kiteconnect import KiteConnect
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from deploy.local.procs import RedisServer, free_port
from libs.broker.kite import api_key_fingerprint
from libs.schema import keys
from libs.schema.migrate import upgrade_head
from libs.schema.models import StrategyConfig, StrategyStatus
from libs.schema.tables import BrokerCredential, NotificationSettings, Strategy, User
from libs.service.secretbox import SecretBox, generate_key
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import load_run, plan_run, run_id_for
from libs.trading.tags import order_tag
from tests.support.kite_sim import SimAdmin, run_sim, ws_root
from tests.support.postgres import running_postgres

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend must be chosen first

ROOT = Path(__file__).resolve().parents[1]
OUT_PNG = ROOT / "bench" / "out" / "stoploss.png"
DATA = ROOT / "services" / "kite_sim" / "data" / "nse_equities.csv"
PROBES = int(os.environ.get("BENCH_PROBES", "150"))
SYMBOLS = 500
SCENARIOS = tuple((int(a), int(b)) for a, b in (s.split(":") for s in os.environ.get("BENCH_SCENARIOS", "1000:1000,1000:5000,10000:1000,10000:5000").split(",")))
CALENDAR = MarketCalendar("always_open")


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    """Print one figure as a JSON line."""
    print(orjson.dumps({"bench": "stoploss", "metric": metric, "value": round(value, 4), "unit": unit,
                        **params}).decode(), flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def instruments(limit: int = SYMBOLS) -> list[tuple[str, float]]:
    with DATA.open() as f:
        rows = [(r["tradingsymbol"], float(r["last_price"])) for r in csv.DictReader(f)
                if r["segment"] == "NSE" and float(r["last_price"]) >= 50]
    if len(rows) < limit:
        raise RuntimeError(f"{DATA} lists {len(rows)} NSE equities priced >= 50, the bench needs {limit}")
    return rows[:limit]


async def load_strategies(redis: Redis, n: int, symbols: list[tuple[str, float]], started: datetime,
                          owners: dict[str, tuple[str, str]] | None = None) -> dict[str, list]:
    """Load n bought runs; return per symbol its (stop, config) sorted by stop ascending.

    The top strategy of each of the first PROBES symbols belongs to a real account when `owners`
    maps its symbol to (user_id, api_key_fp): those are the ones probes cross.
    """
    per_symbol: dict[str, list] = {s: [] for s, _ in symbols}
    counts = {s: 0 for s, _ in symbols}
    for i in range(n):
        symbol, base = symbols[i % len(symbols)]
        counts[symbol] += 1
    nobody = ("00000000-0000-4000-8000-000000000001", None)
    for i in range(n):
        symbol, base = symbols[i % len(symbols)]
        rank = i // len(symbols)
        top = rank == counts[symbol] - 1
        user, fp = (owners or {}).get(symbol, nobody) if top else nobody
        # Distinct stops on a 0.05 grid between 80 % and 90 % of base.
        step = max(0.05, round(base * 0.10 / max(1, counts[symbol]) / 0.05) * 0.05)
        stop = round(round(base * 0.80 / 0.05) * 0.05 + rank * step, 2)
        sid = f"{i:08d}-0000-4000-8000-{i:012d}"
        config = StrategyConfig(strategy_id=sid, user_id=user, symbol=symbol, buy_time=clock_time(9, 30),
                                sell_time=clock_time(15, 0), stop_loss=stop, quantity=1, status="running",
                                run_id=run_id_for(started), api_key_fp=fp)
        await load_run(redis, config, plan_run(config, CALENDAR, started))
        per_symbol[symbol].append((stop, config))
    async with redis.pipeline(transaction=False) as pipe:
        for entries in per_symbol.values():
            for _, config in entries:
                pipe.hset(keys.runtime_key(config.strategy_id), "position", "bought")
        await pipe.execute()
    await redis.delete(keys.SCHEDULE)  # no BUY/SELL may fire during the run
    for entries in per_symbol.values():
        entries.sort(key=lambda e: e[0])
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


async def follow_stoplosses(redis: Redis, arrivals: dict[str, asyncio.Future],
                            exits: dict[str, asyncio.Future]) -> None:
    """Resolve `arrivals` when a STOPLOSS is queued and `exits` when the executor commits the run's exit.

    Event-driven (XREAD BLOCK), so waiting for the executor does not load the simulator
    it is being timed against.
    """
    last = {keys.ORDERS_STREAM: "$", keys.CONTROL_STREAM: "$"}
    while True:
        reply = await redis.xread(last, block=1000, count=100)
        now, epoch = time.perf_counter(), time.time()
        for stream, entries in reply or ():
            name = stream.decode()
            for msg_id, fields in entries:
                last[name] = msg_id
                body = orjson.loads(fields[b"event"])
                if name == keys.CONTROL_STREAM and body.get("position") not in ("exited_by_sl", "sold"):
                    continue
                fut = (arrivals if name == keys.ORDERS_STREAM else exits).get(body["strategy_id"])
                if fut is not None and not fut.done():
                    seen = body.get("trigger_time")
                    fut.set_result((now, epoch, datetime.fromisoformat(seen).timestamp() if seen else None))


WITH_API = "BENCH_HANGING_WEBHOOKS" in os.environ
HANGING_WEBHOOKS = int(os.environ.get("BENCH_HANGING_WEBHOOKS") or "0")
ACCOUNTS = max(20, HANGING_WEBHOOKS)
HANG_URL: list[str] = []  # the hanging receiver's URL, once started


async def with_executor(redis: Redis, redis_url: str, database_url: str, sim_url: str, admin: SimAdmin, n: int,
                        symbols: list[tuple[str, float]], started: datetime,
                        log_dir: Path) -> tuple[dict[str, list], list[subprocess.Popen[bytes]]]:
    """Load the runs with real owners for the probed ones, buy those at the broker, start an executor.

    With hanging webhooks, also start an API process (it runs the notification deliverer).
    """
    key = generate_key()
    box = SecretBox.from_b64(key)
    accounts = [admin.create_account(f"bench-{i}") for i in range(ACCOUNTS)]
    users = [str(uuid.uuid4()) for _ in accounts]
    fps = [api_key_fingerprint(a["api_key"]) for a in accounts]
    probe_symbols = [s for s, _ in symbols[:PROBES]]
    owners = {sym: (users[i % ACCOUNTS], fps[i % ACCOUNTS]) for i, sym in enumerate(probe_symbols)}
    per_symbol = await load_strategies(redis, n, symbols, started, owners)
    probes = [per_symbol[sym][-1][1] for sym in probe_symbols]
    engine = create_async_engine(database_url)
    ciphers = []
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE order_logs, strategies, broker_credentials, users CASCADE"))
        for user, acct, fp in zip(users, accounts, fps, strict=True):
            enc = {c: box.encrypt(acct[c], f"broker_credentials:{user}:{c}")
                   for c in ("api_key", "api_secret", "access_token")}
            ciphers.append(enc)
            await conn.execute(User.__table__.insert().values(id=user, name="Bench", email=f"{user}@bench.test",
                                                              password_hash="x"))
            await conn.execute(BrokerCredential.__table__.insert().values(
                user_id=user, **enc, is_valid=True, key_id=box.current_key_id, api_key_hint=acct["api_key"][-4:],
                api_key_fp=fp))
        for user in users[:HANGING_WEBHOOKS] if HANG_URL else ():
            await conn.execute(NotificationSettings.__table__.insert().values(
                user_id=user, webhook_url=HANG_URL[0], key_id=box.current_key_id,
                webhook_secret=box.encrypt("whsec_bench", f"notification_settings:{user}:webhook_secret")))
        await conn.execute(Strategy.__table__.insert(), [
            dict(id=c.strategy_id, user_id=c.user_id, symbol=c.symbol, buy_time=c.buy_time, sell_time=c.sell_time,
                 stop_loss=c.stop_loss, quantity=1, status=StrategyStatus.running, started_at=started)
            for c in probes])
    await engine.dispose()
    for user, enc, fp in zip(users, ciphers, fps, strict=True):
        await redis.hset(keys.broker_credentials_key(user), mapping={
            "api_key": enc["api_key"], "access_token": enc["access_token"], "api_key_fp": fp, "is_valid": "1"})
    await asyncio.to_thread(place_entries, sim_url, accounts, users, probes, started)
    env = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "TICKWISE_SECRET_KEY": key,
           "TICKWISE_KITE_ROOT": sim_url}
    port = free_port()
    procs = [start_executor({**env, "TICKWISE_HEALTH_PORT": str(port)}, log_dir / "executor.log")]
    ports = [port]
    if WITH_API:
        ports.append(free_port())
        procs.append(start_executor({**env, "TICKWISE_HEALTH_PORT": str(ports[-1]),
                                     "TICKWISE_NOTIFY_ALLOW_PRIVATE_TARGETS": "true"}, log_dir / "api.log",
                                    module="services.api"))
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        for ready_port in ports:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"http://127.0.0.1:{ready_port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
    for config in probes:  # reconciliation must have confirmed the entries
        while time.monotonic() < deadline:
            if await redis.hget(keys.runtime_key(config.strategy_id), "position") == b"bought":
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # reconciliation finished writing
    return per_symbol, procs


def start_executor(extra_env: dict[str, str], log_path: Path,
                   module: str = "services.executor") -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TICKWISE_MARKET_CALENDAR": "always_open",
           "TICKWISE_LOG_LEVEL": "WARNING", **extra_env}
    log = log_path.open("wb")
    return subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def place_entries(sim_url: str, accounts: list[dict], users: list[str], probes: list[StrategyConfig],
                  started: datetime) -> None:
    """Buy each probed strategy at the broker with its entry tag, under 10 orders/s per account."""
    clients = {u: KiteConnect(a["api_key"], access_token=a["access_token"], root=sim_url)
               for u, a in zip(users, accounts, strict=True)}

    def buy_all(user: str) -> None:
        for c in probes:
            if str(c.user_id) != user:
                continue
            tag = order_tag(c.strategy_id, c.run_id, plan_run(c, CALENDAR, started).trading_day, "entry")
            clients[user].place_order(variety="regular", exchange="NSE", tradingsymbol=c.symbol,
                                      transaction_type="BUY", quantity=1, product="MIS", order_type="MARKET",
                                      tag=tag, market_protection=-1)
            time.sleep(0.12)

    with ThreadPoolExecutor(len(users)) as pool:
        list(pool.map(buy_all, users))


async def sell_received_at(session: aiohttp.ClientSession, sim_url: str, config: StrategyConfig) -> float | None:
    """Return when the simulator received the run's exit order (epoch s), waiting up to 3 s."""
    tag = order_tag(config.strategy_id, config.run_id, plan_run(config, CALENDAR,
                    datetime.fromisoformat(config.run_id)).trading_day, "exit")
    for _ in range(3000):
        async with session.get(f"{sim_url}/sim/orders", params={"tag": tag}) as resp:
            orders = await resp.json()
        if orders:
            return min(o["received_at"] for o in orders)
        await asyncio.sleep(0.001)
    return None


LEGS = ("sim_to_listener", "listener_to_reader", "reader_to_sell")


async def trigger_seconds(session: aiohttp.ClientSession, port: int) -> float | None:
    """Return the listener's summed tick-to-trigger seconds (its histogram's _sum) from /metrics."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text_ = await resp.text()
    for line in text_.splitlines():
        if line.startswith("listener_tick_to_trigger_seconds_sum "):
            return float(line.split()[1])
    return None


async def tick_floor(session: aiohttp.ClientSession, sim_url: str, admin: SimAdmin, symbol: tuple[str, float],
                     samples: int = 100) -> tuple[list[float], list[float]]:
    """Time ticks from just before their POST to a bare WebSocket client having them (ms), under the same load.

    The part of the stop-loss path no listener can remove: the admin request, the
    simulator's frame push, the socket. Measured twice, one client at a time: on
    this loop, then in a process of its own that does nothing else, as the
    listener does (it pays the machine's wake-up of an idle process). Returns
    (this process, own process).
    """
    account = admin.create_account("floor")
    token = instrument_token(symbol[0])
    url = f"{ws_root(sim_url)}?api_key={account['api_key']}&access_token={account['access_token']}"
    # Outside the background ticks' +-3 %: a frame is the probe's by its price, not by its timing.
    prices = (round(symbol[1] * 1.05, 2), round(symbol[1] * 1.06, 2))

    async def post(i: int) -> float:
        """POST the i-th floor tick; return its price."""
        async with session.post(f"{sim_url}/sim/ticks",
                                data=orjson.dumps([{"symbol": symbol[0], "last_price": prices[i % 2]}])) as resp:
            await resp.read()
        return prices[i % 2]

    here: list[float] = []
    async with session.ws_connect(url) as ws:
        await subscribe_ltp(ws, token)

        async def next_tick(paise: int) -> float:
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.BINARY and ltp_paise(msg.data) == paise:
                    return time.perf_counter()

        for i in range(samples):
            # Already waiting before the POST: the frame is timed when it arrives, not after
            # the POST's reply has been read.
            arrival = asyncio.ensure_future(next_tick(round(prices[i % 2] * 100)))
            t0 = time.perf_counter()
            await post(i)
            here.append((await asyncio.wait_for(arrival, 2.0) - t0) * 1000)
            await asyncio.sleep(0.01)
    child = start_floor_client(url, token, samples, prices)
    posted: list[float] = []
    try:
        ready = await asyncio.to_thread(child.stdout.readline)  # type: ignore[union-attr]
        if ready.strip() != "ready":
            raise RuntimeError("floor client did not start")
        for i in range(samples):
            posted.append(time.time())
            await post(i)
            await asyncio.sleep(0.01)
        arrived = orjson.loads(await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 10))  # type: ignore[union-attr]
    finally:
        stop_child(child)
    return here, [(a - t) * 1000 for a, t in zip(arrived, posted, strict=True)]


def start_floor_client(url: str, token: int, samples: int, prices: tuple[float, float]) -> subprocess.Popen[str]:
    """Start `floor_client` in a process of its own."""
    return subprocess.Popen([sys.executable, "-m", "bench.bench_stoploss", "--floor-client", url, str(token),
                             str(samples), *(str(round(p * 100)) for p in prices)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


def ltp_paise(data: bytes) -> int | None:
    """Return the price (paise) of a one-packet LTP frame, else None."""
    if len(data) != 12:  # count, length, then token and price
        return None
    return int.from_bytes(data[8:12], "big")


def stop_child(child: subprocess.Popen[str]) -> None:
    child.kill()
    child.wait(timeout=10)


async def subscribe_ltp(ws: aiohttp.ClientWebSocketResponse, token: int) -> None:
    """Subscribe one token in LTP mode and swallow the subscription snapshots."""
    await ws.send_str(orjson.dumps({"a": "subscribe", "v": [token]}).decode())
    await ws.send_str(orjson.dumps({"a": "mode", "v": ["ltp", [token]]}).decode())
    with contextlib.suppress(TimeoutError):
        while True:
            await asyncio.wait_for(ws.receive(), 0.3)


async def floor_client(url: str, token: int, samples: int, paise: set[int]) -> None:
    """Print "ready", then the arrival time (epoch s) of each of `samples` ticks at `paise`, as one JSON list."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await subscribe_ltp(ws, token)
        print("ready", flush=True)
        arrived: list[float] = []
        while len(arrived) < samples:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY and ltp_paise(msg.data) in paise:
                arrived.append(time.time())
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return
        print(orjson.dumps(arrived).decode(), flush=True)


def cpu_seconds(pid: int) -> float:
    """Return the CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def instrument_token(symbol: str) -> int:
    with DATA.open() as f:
        return next(int(r["instrument_token"]) for r in csv.DictReader(f) if r["tradingsymbol"] == symbol)


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
                   rate: int, symbols: list[tuple[str, float]], log_dir: Path,
                   database_url: str | None = None) -> dict[str, Any]:
    await redis.flushall()
    admin.reset()  # prices back to base: a stop left crossed by the last scenario would fire at subscribe
    started = datetime.now(UTC)
    redis_url = f"redis://127.0.0.1:{redis.connection_pool.connection_kwargs['port']}/0"
    executor, children = None, []
    if database_url is None:
        per_symbol = await load_strategies(redis, n, symbols, started)
    else:
        per_symbol, children = await with_executor(redis, redis_url, database_url, sim_url, admin, n, symbols,
                                                   started, log_dir)
        executor = children[0]
    proc, port = start_listener(redis_url, sim_url, admin.create_account("market-data"), log_dir)
    full: list[float] = []
    try:
        await wait_health(session, port, n)
        stop, sent = asyncio.Event(), [0]
        ticker = asyncio.create_task(background_ticks(session, sim_url, symbols, rate, stop, sent))
        arrivals: dict[str, asyncio.Future] = {}
        exits: dict[str, asyncio.Future] = {}
        sent_at: list[tuple[StrategyConfig, float]] = []
        reader_client = Redis(port=redis.connection_pool.connection_kwargs["port"])
        reader = asyncio.create_task(follow_stoplosses(reader_client, arrivals, exits))
        await asyncio.sleep(1.0)  # background load settles
        floor, floor_process = await tick_floor(session, sim_url, admin, symbols[-1])
        latencies, missed = [], 0
        legs: list[dict[str, Any]] = []
        trigger_sum = await trigger_seconds(session, port) or 0.0
        began, sent_before, cpu_before = time.perf_counter(), sent[0], cpu_seconds(proc.pid)
        order = [s for s, _ in symbols]
        for i in range(PROBES):
            symbol = order[i % len(order)]
            stop_loss, config = per_symbol[symbol].pop()
            sid = str(config.strategy_id)
            fut = arrivals[sid] = asyncio.get_running_loop().create_future()
            exited = exits[sid] = asyncio.get_running_loop().create_future()
            t0_epoch, t0 = time.time(), time.perf_counter()
            async with session.post(f"{sim_url}/sim/ticks",
                                    data=orjson.dumps([{"symbol": symbol, "last_price": stop_loss}])) as resp:
                await resp.read()
            try:
                arrived, arrived_epoch, seen_epoch = await asyncio.wait_for(fut, 2.0)
            except TimeoutError:
                missed += 1
                continue
            latencies.append((arrived - t0) * 1000)
            if executor is not None:
                # One probe at a time; the SELL's arrival is read from the simulator afterwards.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(exited, 3.0)
                sent_at.append((config, t0_epoch))
            trigger_s = await trigger_seconds(session, port)  # after the probe: outside the timed span
            if seen_epoch is not None and trigger_s is not None:
                legs.append({"sim_to_listener": seen_epoch - t0_epoch, "listener_to_reader": arrived_epoch - seen_epoch,
                             "listener_script": trigger_s - trigger_sum, "arrived_epoch": arrived_epoch, "sid": sid})
            trigger_sum = trigger_s if trigger_s is not None else trigger_sum
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - began
        achieved = (sent[0] - sent_before) / elapsed
        listener_cpu = (cpu_seconds(proc.pid) - cpu_before) / elapsed
        stop.set()
        await ticker
        by_sid = {leg["sid"]: leg for leg in legs}
        for config, t0_epoch in sent_at:
            received = await sell_received_at(session, sim_url, config)
            if received is not None:
                full.append((received - t0_epoch) * 1000)
                leg = by_sid.get(str(config.strategy_id))
                if leg is not None:
                    leg["reader_to_sell"] = received - leg["arrived_epoch"]
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await reader_client.aclose()
    finally:
        for child in (proc, *children):
            child.terminate()
            child.wait(timeout=30)
    result = {"strategies": n, "symbols": len(symbols), "ticks_per_s": rate,
              "achieved_ticks_per_s": round(achieved), "p50": pct(latencies, 0.50), "p99": pct(latencies, 0.99),
              "samples": len(latencies), "missed": missed, "listener_cpu_share": listener_cpu, "tick_floor_p50": pct(floor, 0.5),
              "tick_floor_p99": pct(floor, 0.99), "tick_floor_process_p50": pct(floor_process, 0.5),
              "tick_floor_process_p99": pct(floor_process, 0.99),
              "breakdown_p50": {name: round(statistics.median(leg[name] for leg in legs if name in leg) * 1000, 3)
                                for name in LEGS if any(name in leg for leg in legs)},
              "listener_script_p50": statistics.median(leg["listener_script"] for leg in legs) * 1000 if legs else -1}
    if full:
        result.update(full_p50=pct(full, 0.50), full_p99=pct(full, 0.99), full_samples=len(full))
    return result


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
                    emit_floor_and_breakdown(r, params)
                if (ROOT / "services" / "executor" / "__main__.py").exists():
                    hang = hanging_receiver() if HANGING_WEBHOOKS else None
                    with running_postgres(Path(tmp) / "pg") as db_url:
                        upgrade_head(db_url)
                        for n, rate in SCENARIOS:
                            r = await scenario(redis, session, sim_url, admin, n, rate, symbols, Path(tmp), db_url)
                            results.append({**r, "executor": True})
                            params = {k: r.get(k) for k in ("strategies", "symbols", "ticks_per_s",
                                                            "achieved_ticks_per_s", "full_samples", "missed")}
                            if WITH_API:
                                params["hanging_webhooks"] = HANGING_WEBHOOKS
                                params["webhook_calls_hanging"] = await hanging_calls(session)
                            emit("tick_to_sell_at_broker_p50", r.get("full_p50", -1), "ms", **params,
                                 listener_leg_p50=round(r["p50"], 3),
                                 ratio_to_redis_rtt=round(r.get("full_p50", 0) / redis_rtt, 1),
                                 ratio_to_http_rtt=round(r.get("full_p50", 0) / http_rtt, 1))
                            emit("tick_to_sell_at_broker_p99", r.get("full_p99", -1), "ms", **params,
                                 listener_leg_p99=round(r["p99"], 3))
                            emit_floor_and_breakdown(r, params)
                    if hang is not None:
                        hang.terminate()
                        hang.wait(timeout=15)
        finally:
            await redis.aclose()
            server.stop()
    plot(results, redis_rtt, http_rtt)


def emit_floor_and_breakdown(r: dict[str, Any], params: dict[str, Any]) -> None:
    """Print the same run's floor (POST -> a bare WebSocket client has the tick) and where the p50 goes."""
    emit("tick_floor_p50", r["tick_floor_p50"], "ms", **params, p99=round(r["tick_floor_p99"], 3))
    emit("tick_floor_process_p50", r["tick_floor_process_p50"], "ms", **params,
         p99=round(r["tick_floor_process_p99"], 3))
    emit("listener_cpu_share", r["listener_cpu_share"], "cores", **params)
    emit("stoploss_breakdown_p50", sum(r["breakdown_p50"].values()), "ms", **params, **r["breakdown_p50"],
         listener_script=round(r["listener_script_p50"], 3))


def hanging_receiver() -> subprocess.Popen[bytes]:
    """Start, in its own process, a webhook receiver on loopback that accepts requests and never answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_stoploss", "--hanging-receiver", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/calls", timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    HANG_URL.append(f"http://127.0.0.1:{port}/hook")
    return proc


async def hanging_calls(session: aiohttp.ClientSession) -> int:
    """Return how many webhook calls the hanging receiver has held open or timed out."""
    if not HANG_URL:
        return 0
    async with session.get(HANG_URL[0].replace("/hook", "/calls")) as resp:
        return int(await resp.text())


def serve_hanging_receiver(port: int) -> None:
    calls = [0]

    async def hang(_request: web.Request) -> web.Response:
        calls[0] += 1
        await asyncio.sleep(3600)
        return web.Response()

    async def count(_request: web.Request) -> web.Response:
        return web.Response(text=str(calls[0]))

    app = web.Application()
    app.router.add_post("/hook", hang)
    app.router.add_get("/calls", count)
    web.run_app(app, host="127.0.0.1", port=port, print=None, shutdown_timeout=0.1)


def plot(results: list[dict[str, Any]], redis_rtt: float, http_rtt: float) -> None:
    rows = [(f"{r['strategies'] // 1000}k/{r['ticks_per_s'] // 1000}k\n"
             + ("-> SELL at broker" if r.get("executor") else "-> STOPLOSS"),
             r.get("full_p50", 0) if r.get("executor") else r["p50"],
             r.get("full_p99", 0) if r.get("executor") else r["p99"]) for r in results]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.bar([i - 0.2 for i in x], [r[1] for r in rows], width=0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [r[2] for r in rows], width=0.4, label="p99")
    ax.axhline(redis_rtt, color="green", linestyle=":", label=f"bare Redis RTT {redis_rtt:.2f} ms")
    ax.axhline(http_rtt, color="purple", linestyle=":", label=f"bare HTTP RTT {http_rtt:.2f} ms")
    floor = statistics.median(r["tick_floor_p50"] for r in results)
    ax.axhline(floor, color="orange", linestyle=":", label=f"tick floor (POST -> bare WebSocket client) {floor:.2f} ms")
    own = statistics.median(r["tick_floor_process_p50"] for r in results)
    ax.axhline(own, color="red", linestyle=":", label=f"tick floor, client in its own process {own:.2f} ms")
    ax.axhline(2, color="grey", linestyle="--", linewidth=0.8, label="p50 target 2 ms")
    ax.axhline(10, color="black", linestyle="--", linewidth=0.8, label="p99 target 10 ms")
    ax.set_xticks(list(x), [r[0] for r in rows], fontsize=7)
    ax.set_ylabel("ms from POST of the crossing tick")
    ax.set_title("Stop-loss reaction (strategies / background ticks per s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=110)

if __name__ == "__main__":
    if sys.argv[1:2] == ["--hanging-receiver"]:
        serve_hanging_receiver(int(sys.argv[2]))
    elif sys.argv[1:2] == ["--floor-client"]:
        asyncio.run(floor_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), {int(a) for a in sys.argv[5:]}))
    else:
        asyncio.run(run())
