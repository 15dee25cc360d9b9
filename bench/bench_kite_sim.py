"""Benchmark the Kite simulator through the official client: orders/s, ticks/s, tick latency.

Run: `python -m bench.bench_kite_sim`. Prints one JSON line per figure and
writes `bench/out/kite_sim.png`. Numbers are reported, never asserted.
Orders go out from several threads over many accounts, each paced below
Kite's 10 orders/s, so the figure is the simulator's (and client's)
throughput rather than the rate limit. `--history` reads each order's
history after placing it, as the executor does (the simulator's two hot
routes); CPU per order then covers both calls.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import matplotlib
import orjson
from kiteconnect import KiteConnect, KiteTicker
from kiteconnect.exceptions import KiteException, NetworkException
from twisted.internet import reactor

from bench.bench_executor import cpu_seconds, sim_pid
from tests.support.kite_sim import SimAdmin, run_sim, ws_root

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend must be chosen first

OUT_PNG = Path(__file__).with_name("out") / "kite_sim.png"
PER_ACCOUNT_GAP_S = 0.11  # one order per 110 ms keeps every account under 10/s


def emit(metric: str, value: float, unit: str) -> None:
    """Print one benchmark figure as a JSON line."""
    print(orjson.dumps({"bench": "kite_sim", "metric": metric, "value": round(value, 3), "unit": unit}).decode(),
          flush=True)


def open_accounts(base_url: str, admin: SimAdmin, accounts: int) -> list[KiteConnect]:
    """Open paper accounts and return an official client logged in to each."""
    clients = []
    for _ in range(accounts):
        acct = admin.create_account()
        clients.append(KiteConnect(acct["api_key"], access_token=acct["access_token"], root=base_url, timeout=10))
    return clients


def bench_orders(clients: list[KiteConnect], symbols: list[str], threads: int, seconds: float,
                 history: bool = False) -> dict[str, Any]:
    """Place MARKET orders from `threads` threads for `seconds`; return counts and completion times."""
    done: list[float] = []
    counts = {"ok": 0, "429": 0, "error": 0}
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + seconds

    def worker(mine: list[KiteConnect], seed: int) -> None:
        rng = random.Random(seed)
        last_use = {id(c): 0.0 for c in mine}
        local_done: list[float] = []
        local = {"ok": 0, "429": 0, "error": 0}
        for client in itertools.cycle(mine):
            now = time.perf_counter()
            if now >= stop_at:
                break
            wait = last_use[id(client)] + PER_ACCOUNT_GAP_S - now
            if wait > 0:
                time.sleep(wait)
            last_use[id(client)] = time.perf_counter()
            try:
                order_id = client.place_order(variety="regular", exchange="NSE", tradingsymbol=rng.choice(symbols),
                                              transaction_type=rng.choice(("BUY", "SELL")), quantity=1,
                                              product="MIS", order_type="MARKET", market_protection=-1)
                if history:
                    client.order_history(order_id)
                local["ok"] += 1
                local_done.append(time.perf_counter() - start)
            except NetworkException:
                local["429"] += 1
            except KiteException:
                local["error"] += 1
        with lock:
            done.extend(local_done)
            for key, value in local.items():
                counts[key] += value

    groups = [clients[i::threads] for i in range(threads)]
    pool = [threading.Thread(target=worker, args=(g, i)) for i, g in enumerate(groups)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "done": sorted(done), **counts}


class TickCounter:
    """A threaded KiteTicker that counts ticks and timestamps them."""

    def __init__(self, base_url: str, api_key: str, access_token: str) -> None:
        self.kt = KiteTicker(api_key, access_token, root=ws_root(base_url))
        self.connected = threading.Event()
        self.count = 0
        self.arrivals: list[tuple[float, int]] = []
        self.waiting_for: tuple[int, float] | None = None
        self.seen = threading.Event()
        self.kt.on_connect = lambda ws, resp: self.connected.set()
        self.kt.on_ticks = self.on_ticks

    def on_ticks(self, ws: Any, ticks: list[dict[str, Any]]) -> None:
        self.count += len(ticks)
        self.arrivals.append((time.perf_counter(), len(ticks)))
        target = self.waiting_for
        if target is not None and any(t["instrument_token"] == target[0] and t["last_price"] == target[1]
                                      for t in ticks):
            self.seen.set()


def bench_ticks(base_url: str, admin: SimAdmin, instruments: list[dict[str, Any]], seconds: float,
                samples: int) -> dict[str, Any]:
    """Push bulk ticks for `seconds` and count what one KiteTicker receives; then time single ticks."""
    acct = admin.create_account()
    counter = TickCounter(base_url, acct["api_key"], acct["access_token"])
    counter.kt.connect(threaded=True)
    if not counter.connected.wait(10):
        raise RuntimeError("ticker did not connect")
    tokens = [i["instrument_token"] for i in instruments]
    reactor.callFromThread(counter.kt.subscribe, tokens)
    reactor.callFromThread(counter.kt.set_mode, KiteTicker.MODE_QUOTE, tokens)
    deadline = time.monotonic() + 5
    while counter.count < len(tokens) and time.monotonic() < deadline:
        time.sleep(0.01)  # wait for the subscription snapshot before counting

    rng = random.Random(5)
    base_prices = {i["tradingsymbol"]: i["last_price"] for i in instruments}
    counter.count, counter.arrivals = 0, []
    start = time.perf_counter()
    pushes = 0
    while time.perf_counter() - start < seconds:
        admin.ticks(*[(s, round(p * (1 + rng.uniform(-0.01, 0.01)), 2)) for s, p in base_prices.items()])
        pushes += 1
    time.sleep(0.2)  # let the last frames land
    received, elapsed = counter.count, time.perf_counter() - start
    arrivals = [(t - start, n) for t, n in counter.arrivals]

    latencies = []
    first = instruments[0]
    for k in range(samples):
        price = round(first["last_price"] + 0.05 * (k + 1), 2)
        counter.seen.clear()
        counter.waiting_for = (first["instrument_token"], price)
        t0 = time.perf_counter()
        admin.ticks((first["tradingsymbol"], price))
        if counter.seen.wait(2):
            latencies.append((time.perf_counter() - t0) * 1000)
    reactor.callFromThread(counter.kt.close)
    return {"received": received, "elapsed": elapsed, "pushed": pushes * len(tokens), "arrivals": arrivals,
            "latencies": sorted(latencies)}


def percentile(sorted_values: list[float], q: float) -> float:
    """Return the q-quantile of already sorted values."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def plot(orders: dict[str, Any], ticks: dict[str, Any]) -> None:
    """Draw orders/s and ticks/s over time and the tick latency histogram."""
    OUT_PNG.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    bucket = 0.25
    order_bins: dict[int, int] = {}
    for t in orders["done"]:
        order_bins[int(t / bucket)] = order_bins.get(int(t / bucket), 0) + 1
    xs = sorted(order_bins)
    ax1.plot([x * bucket for x in xs], [order_bins[x] / bucket for x in xs])
    ax1.set(title="orders/s (kiteconnect, MARKET)", xlabel="s", ylabel="orders/s")
    tick_bins: dict[int, int] = {}
    for t, n in ticks["arrivals"]:
        tick_bins[int(t / bucket)] = tick_bins.get(int(t / bucket), 0) + n
    xs = sorted(tick_bins)
    ax2.plot([x * bucket for x in xs], [tick_bins[x] / bucket for x in xs], color="tab:green")
    ax2.set(title="ticks/s received (KiteTicker, quote)", xlabel="s", ylabel="ticks/s")
    ax3.hist(ticks["latencies"], bins=40, color="tab:orange")
    ax3.set(title="/sim/ticks -> on_ticks latency", xlabel="ms", ylabel="count")
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=100)


def main(argv: list[str] | None = None) -> None:
    """Run both benchmarks against a fresh simulator subprocess."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--accounts", type=int, default=400)
    p.add_argument("--order-seconds", type=float, default=8.0)
    p.add_argument("--tick-seconds", type=float, default=5.0)
    p.add_argument("--latency-samples", type=int, default=300)
    p.add_argument("--history", action="store_true", help="read each order's history after placing it")
    args = p.parse_args(argv)
    with run_sim(tick_interval_ms=0, slippage_bps=5) as url:
        admin = SimAdmin(url)
        acct = admin.create_account()
        instruments = KiteConnect(acct["api_key"], access_token=acct["access_token"], root=url).instruments("NSE")
        symbols = [i["tradingsymbol"] for i in instruments]
        spid = sim_pid(url)
        clients = open_accounts(url, admin, args.accounts)
        cpu_before = cpu_seconds(spid) if spid else 0.0  # orders only: opening the accounts is not counted
        orders = bench_orders(clients, symbols, args.threads, args.order_seconds, args.history)
        sim_cpu = (cpu_seconds(spid) if spid else 0.0) - cpu_before
        emit("orders_per_s", orders["ok"] / orders["elapsed"], "1/s")
        emit("sim_cpu_us_per_order", 1e6 * sim_cpu / max(1, orders["ok"] + orders["429"] + orders["error"]), "us")
        emit("orders_placed", orders["ok"], "orders")
        emit("orders_429", orders["429"], "orders")
        emit("orders_other_errors", orders["error"], "orders")
        ticks = bench_ticks(url, admin, instruments, args.tick_seconds, args.latency_samples)
        emit("ticks_per_s", ticks["received"] / ticks["elapsed"], "1/s")
        emit("ticks_delivered_ratio", ticks["received"] / max(1, ticks["pushed"]), "ratio")
        lat = ticks["latencies"]
        emit("tick_latency_p50_ms", statistics.median(lat) if lat else float("nan"), "ms")
        emit("tick_latency_p99_ms", percentile(lat, 0.99), "ms")
    plot(orders, ticks)


if __name__ == "__main__":
    main()
