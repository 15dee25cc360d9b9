"""`make demo`: a scripted paper-trading day, driven only through the public HTTP API.

Starts the local stack, registers a user, connects a paper broker account,
creates three strategies a few seconds ahead and starts them:
  A  INFY      bought at its buy_time, sold at its sell_time
  B  RELIANCE  bought, then stopped out by a price drop pushed to the simulator
  C  TCS       stopped by the user before its buy_time: never trades
prints a live timeline and the final status and order logs, then stops what it
started (a stack already running from `make up` is left running).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from deploy.local.stack import LocalStack
from libs.trading.calendar import IST

PRICES = {"INFY": 1500.0, "RELIANCE": 2500.0, "TCS": 3500.0}


@dataclass
class Story:
    label: str
    symbol: str
    buy_in_s: int
    sell_in_s: int
    stop_loss: float
    quantity: int
    expect: str
    strategy_id: str = ""
    seen: set[str] = field(default_factory=set)
    events: list[str] = field(default_factory=list)


class DemoError(RuntimeError):
    """The demo could not complete a step; the message says which."""


class Api:
    """A tiny client of the public API."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base, self.token = session, base.rstrip("/"), ""

    async def call(self, method: str, path: str, body: Any = None, expect: int | tuple[int, ...] = 200) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.session.request(method, f"{self.base}/api/v1{path}", json=body, headers=headers) as r:
            data = await r.json(content_type=None) if r.status != 204 else None
            allowed = (expect,) if isinstance(expect, int) else expect
            if r.status not in allowed:
                raise DemoError(f"{method} {path} -> {r.status}: {data}")
            return data


def _clock(offset_s: int) -> str:
    return (datetime.now(IST) + timedelta(seconds=offset_s)).strftime("%H:%M:%S")


def _ts() -> str:
    return datetime.now(IST).strftime("%H:%M:%S.%f")[:-3]


def _say(text: str) -> None:
    print(f"  {_ts()}  {text}", flush=True)


def _items(data: Any) -> list[dict[str, Any]]:
    return data if isinstance(data, list) else data.get("items", [])


async def _wait_until_safe_of_midnight() -> None:
    """Strategy times are wall-clock IST; a run must not straddle midnight."""
    now = datetime.now(IST)
    left = (now.replace(hour=23, minute=59, second=59) - now).total_seconds()
    if left < 90:
        print(f"tickwise demo: waiting {left + 2:.0f}s for IST midnight to pass")
        await asyncio.sleep(left + 2)


async def _sim(session: aiohttp.ClientSession, sim: str, path: str, body: Any) -> Any:
    async with session.post(f"{sim}/sim/{path}", json=body) as r:
        if r.status != 200:
            raise DemoError(f"simulator {path} -> {r.status}: {await r.text()}")
        return await r.json()


async def run_demo(env: dict[str, str]) -> int:
    api_url, sim_url = env["API_URL"], env["SIM_URL"]
    stories = [
        Story("A", "INFY", 4, 12, 1400.0, 10, "sold at its sell_time"),
        Story("B", "RELIANCE", 4, 60, 2450.0, 5, "stopped out by a price drop"),
        Story("C", "TCS", 20, 40, 3300.0, 3, "stopped by the user before its buy"),
    ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        api = Api(session, api_url)
        await _wait_until_safe_of_midnight()
        print("\n== 1. a user, a paper broker account, three strategies")
        email = f"demo-{int(time.time())}@example.com"
        await api.call("POST", "/auth/register", {"email": email, "password": "correct-horse-9",
                                                  "name": "Demo Trader"}, expect=201)
        api.token = (await api.call("POST", "/auth/login", {"email": email, "password": "correct-horse-9"}))[
            "access_token"]
        _say(f"registered and logged in as {email}")
        account = await _sim(session, sim_url, "accounts", {"user_name": "Demo Trader"})
        broker = await api.call("POST", "/broker/connect", {k: account[k] for k in
                                                            ("api_key", "api_secret", "access_token")})
        _say(f"paper broker connected: valid={broker['is_valid']} key={broker['api_key_hint']}")
        await _sim(session, sim_url, "ticks", [{"symbol": s, "last_price": p} for s, p in PRICES.items()])
        for s in stories:
            created = await api.call("POST", "/strategies", {
                "symbol": s.symbol, "buy_time": _clock(s.buy_in_s), "sell_time": _clock(s.sell_in_s),
                "stop_loss": s.stop_loss, "quantity": s.quantity}, expect=201)
            s.strategy_id = created["id"]
            await api.call("POST", "/strategies/start", {"strategy_id": s.strategy_id})
            _say(f"{s.label} {s.symbol:<9} buy {created['buy_time']} sell {created['sell_time']} "
                 f"stop-loss {s.stop_loss:.2f} qty {s.quantity}: started ({s.expect})")

        print("\n== 2. the trading day, live")
        print(f"  {'time (IST)':<13} {'':2} {'symbol':<9} {'event':<9} {'status':<8} {'price':>9}  broker order")
        by_id = {s.strategy_id: s for s in stories}
        stopped_c = dropped_b = False
        day_started = time.monotonic()
        deadline = day_started + 60
        while time.monotonic() < deadline:
            for s in stories:
                for row in reversed(_items(await api.call("GET", f"/strategies/{s.strategy_id}/orders"))):
                    if row["id"] in s.seen:
                        continue
                    s.seen.add(row["id"])
                    s.events.append(f"{row['event_type']}:{row['status']}")
                    resp = row.get("response_payload") or {}
                    price = resp.get("average_price") or resp.get("price") or (row.get("request_payload") or {}
                                                                               ).get("price")
                    price_txt = f"{float(price):9.2f}" if price else f"{'-':>9}"
                    _say(f"{s.label}  {s.symbol:<9} {row['event_type']:<9} {row['status']:<8} {price_txt}  "
                         f"{row.get('broker_order_id') or '-'}")
            statuses = {sid: await api.call("GET", f"/strategies/{sid}/status") for sid in by_id}
            b, c = stories[1], stories[2]
            if not stopped_c and time.monotonic() > day_started + 7:
                await api.call("POST", "/strategies/stop", {"strategy_id": c.strategy_id})
                _say(f"{c.label}  {c.symbol:<9} user stopped the strategy before its buy")
                stopped_c = True
            # Drop the price once the BUY is on the books (its log row shown), so the timeline reads in order.
            if not dropped_b and statuses[b.strategy_id]["position"] == "bought" and "BUY:success" in b.events:
                drop = round(b.stop_loss - 12.5, 2)
                await _sim(session, sim_url, "ticks", {"symbol": b.symbol, "last_price": drop})
                _say(f"{b.label}  {b.symbol:<9} market drops to {drop:.2f} (stop-loss {b.stop_loss:.2f})")
                dropped_b = True
            done = all(statuses[s.strategy_id]["status"] in ("exited", "stopped", "failed") for s in stories)
            if done and stopped_c and all(len(s.seen) >= 2 for s in stories[:2]):
                break
            await asyncio.sleep(0.25)
        else:
            raise DemoError("the trading day did not finish within 60 s")

        print("\n== 3. final status and order logs (read back from the API, stored in Postgres)")
        for s in stories:
            st = await api.call("GET", f"/strategies/{s.strategy_id}/status")
            rows = _items(await api.call("GET", f"/strategies/{s.strategy_id}/orders"))
            print(f"  {s.label} {s.symbol:<9} status={st['status']:<8} position={st['position']:<13} "
                  f"last_action={st.get('last_action') or '-'}")
            for row in reversed(rows):
                at = datetime.fromisoformat(row["created_at"]).astimezone(IST).strftime("%H:%M:%S.%f")[:-3]
                print(f"      {at}  {row['event_type']:<9} {row['status']:<8} "
                      f"order={row.get('broker_order_id') or '-':<12} tag={row.get('tag') or '-'}")
        async with session.get(f"{sim_url}/sim/orders") as r:
            orders = _items(await r.json())
        print(f"\n  the paper broker received {len(orders)} orders: "
              + ", ".join(f"{o['transaction_type']} {o['quantity']} {o['tradingsymbol']}" for o in orders))
    return 0


def _log_sizes(logs: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in logs.glob("*.log")} if logs.exists() else {}


def _log_errors(logs: Path, since: dict[Path, int]) -> list[str]:
    """Return error lines written to the service logs after `since` (this run only)."""
    found = []
    for path in sorted(logs.glob("*.log")):
        with open(path, "rb") as f:
            f.seek(since.get(path, 0))
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line:
                found.append(f"{path.name}: {line[:200]}")
    return found


def stop_what_demo_started(stack: LocalStack) -> None:
    """Stop the stack if the demo started it; else stop only the programs it started (a `make up` stack stays)."""
    if stack.started_supervisor:
        print("\n== stopping the stack")
        stack.down()
        return
    for name in reversed(stack.started):
        stack.stop_program(name)
    print("\n== the stack you started with `make up` is left running"
          + (f" (stopped what the demo started: {', '.join(stack.started)})" if stack.started else ""))


def main() -> int:
    stack = LocalStack()
    started = time.monotonic()
    print("== 0. starting the local stack (Redis, Postgres, Kite simulator, API, scheduler, listener, executor)")
    code = 1
    try:
        mark = _log_sizes(stack.logs)
        try:
            env = stack.up()
        except Exception as exc:  # noqa: BLE001 - one readable line, never a traceback
            raise DemoError(f"the local stack did not start: {exc}") from None
        code = asyncio.run(run_demo(env))
        errors = _log_errors(stack.logs, mark)
        print(f"\n== done in {time.monotonic() - started:.0f}s; "
              f"{'no errors in the service logs' if not errors else f'{len(errors)} error lines in the logs:'}")
        for line in errors[:20]:
            print("  " + line)
    except DemoError as exc:
        print(f"\ntickwise demo failed: {exc}\nservice logs are in {stack.logs}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        if os.environ.get("TICKWISE_DEMO_KEEP") != "1":
            try:
                stop_what_demo_started(stack)
            except Exception as exc:  # noqa: BLE001 - one readable line, never a traceback
                print(f"tickwise demo: could not stop the stack: {exc}; run `make down`", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
