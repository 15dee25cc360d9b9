"""Run the Kite simulator as a real subprocess and talk to its admin API.

Public API (stable; tests/conftest.py and other suites may rely on it):

- `run_sim(port=None, **args)`: context manager. Starts
  `python -m services.kite_sim --host 127.0.0.1 --port PORT [--key value ...]`
  (each keyword becomes a flag: `slippage_bps=10` -> `--slippage-bps 10`,
  `replay_loop=True` -> `--replay-loop`; False/None are left out), waits for
  `/healthz`, yields the base URL `http://127.0.0.1:PORT`, and stops the
  process afterwards (SIGTERM, then SIGKILL). With `port=None` a free port
  is picked (and retried if another process grabbed it first).
- `ws_root(base_url)`: the `root=` for `KiteTicker` (`ws://127.0.0.1:PORT/ws`).
- `SimAdmin(base_url)`: thin client of `/sim/*`: `create_account()`,
  `request_token()`, `expire()`, `ticks()`, `orders()`, `set_liquidity()`, `set_faults()`,
  `faults()`, `drop_ws()`, `reset()`, `health()`.

Only the standard library is used, so the helper works in any test suite.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from tests.support.eventually import eventually_sync

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0

__all__ = ["SimAdmin", "SimError", "run_sim", "ws_root"]


class SimError(RuntimeError):
    """The simulator failed to start or answered an admin call with an error."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli_flags(args: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        flags.extend([flag] if value is True else [flag, str(value)])
    return flags


def ws_root(base_url: str) -> str:
    """Return the KiteTicker `root` for a simulator base URL."""
    return base_url.replace("http://", "ws://", 1).rstrip("/") + "/ws"


def _wait_healthy(proc: subprocess.Popen[bytes], base_url: str, log_path: Path) -> bool:
    """Return True once /healthz answers 200, False if the process exited first."""
    def outcome() -> str | None:
        if proc.poll() is not None:
            return "exited"
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=1) as resp:
                return "healthy" if resp.status == 200 else None
        except OSError:
            return None

    return eventually_sync(outcome, timeout=START_TIMEOUT_S, interval=0.05, fail=lambda: SimError(
        f"kite sim not healthy within {START_TIMEOUT_S}s:\n{log_path.read_text()[-2000:]}")) == "healthy"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def run_sim(port: int | None = None, **args: Any) -> Iterator[str]:
    """Run `python -m services.kite_sim` on loopback; yield its base URL."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    attempts = 1 if port is not None else 3
    with tempfile.TemporaryDirectory(prefix="kite_sim_") as tmp:
        log_path = Path(tmp) / "sim.log"
        for attempt in range(attempts):
            chosen = port if port is not None else _free_port()
            base_url = f"http://127.0.0.1:{chosen}"
            cmd = [sys.executable, "-m", "services.kite_sim", "--host", "127.0.0.1", "--port", str(chosen),
                   *_cli_flags(args)]
            # Output goes to a file, not a pipe: a full pipe nobody reads would stall the simulator.
            with log_path.open("wb") as log_file:
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                if _wait_healthy(proc, base_url, log_path):
                    yield base_url
                    return
            finally:
                _stop(proc)
            if attempt == attempts - 1:
                raise SimError(f"kite sim exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")


class SimAdmin:
    """Call the simulator's `/sim/*` admin API."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        """Send one admin request; return the decoded JSON answer."""
        url = self.base_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = orjson.dumps(body) if body is not None else None
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise SimError(f"{method} {path} -> {exc.code}: {exc.read().decode(errors='replace')}") from exc

    def health(self) -> dict[str, Any]:
        """Return `/healthz`."""
        return self.call("GET", "/healthz")

    def create_account(self, user_name: str | None = None, daily_order_cap: int | None = None,
                       postback_url: str | None = None) -> dict[str, Any]:
        """Open an account: {api_key, api_secret, access_token, user_id, user_name, postback_url}."""
        body = {k: v for k, v in {"user_name": user_name, "daily_order_cap": daily_order_cap,
                                  "postback_url": postback_url}.items() if v}
        return self.call("POST", "/sim/accounts", body)

    def request_token(self, api_key: str) -> str:
        """Issue a request_token for `generate_session`."""
        return self.call("POST", f"/sim/accounts/{api_key}/request_token")["request_token"]

    def expire(self, api_key: str) -> None:
        """Expire the account's access token."""
        self.call("POST", f"/sim/accounts/{api_key}/expire")

    def ticks(self, *ticks: tuple[str, float]) -> int:
        """Set prices `(symbol, last_price)` and push them to subscribers now."""
        body = [{"symbol": s, "last_price": p} for s, p in ticks]
        return self.call("POST", "/sim/ticks", body)["updated"]

    def orders(self, api_key: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        """List every order the simulator received, optionally filtered."""
        query = {k: v for k, v in {"api_key": api_key, "tag": tag}.items() if v is not None}
        return self.call("GET", "/sim/orders", query=query)

    def set_liquidity(self, **settings: Any) -> dict[str, Any]:
        """Change fills: slippage_bps and/or depth_quantity (reset() restores the start-up values)."""
        return self.call("POST", "/sim/liquidity", settings)

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Replace fault settings (latency_ms, error_rate, timeout_after_accept_rate, ...)."""
        return self.call("POST", "/sim/faults", faults)

    def faults(self) -> dict[str, Any]:
        """Return the fault settings."""
        return self.call("GET", "/sim/faults")

    def drop_ws(self, abort: bool = False) -> int:
        """Drop every ticker WebSocket; return how many were dropped."""
        return self.call("POST", "/sim/ws/drop", {"abort": abort})["dropped"]

    def reset(self) -> None:
        """Clear accounts, orders, faults; prices back to base."""
        self.call("POST", "/sim/reset")
