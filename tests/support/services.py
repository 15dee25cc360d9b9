"""Tickwise services as real subprocesses: start one, wait until it is ready, stop it.

Readiness is polled with `eventually_sync` on the service's `/readyz` (plus
any extra condition), never a fixed sleep; a process that exits while being
waited for fails at once with the tail of its log.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.schema.codec import loads
from tests.support.eventually import eventually_sync

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Service:
    """A service subprocess with its health port and log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET a health route; return (status, JSON body)."""
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=2) as resp:
                return resp.status, loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, loads(exc.read() or b"{}")

    def ready(self) -> bool:
        try:
            return self.get("/readyz")[0] == 200
        except (OSError, ValueError):  # not listening yet, or a half-written answer
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int:
        """Send `sig` and wait (SIGKILL after `timeout`); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def spawn(module: str, env: Mapping[str, str], port: int, log_path: Path) -> Service:
    """Start `python -m <module>` with exactly `env`, its output into `log_path`."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", module], cwd=REPO_ROOT, env=dict(env),
                                stdout=log_file, stderr=subprocess.STDOUT)
    return Service(proc, port, log_path)


def wait_ready(service: Service, *, timeout: float = 20.0, also: Callable[[], bool] | None = None) -> None:
    """Wait until `/readyz` answers 200 (and `also()` holds); raise with the log if it exits or times out."""
    def ready() -> bool:
        if service.proc.poll() is not None:
            raise RuntimeError(f"exited {service.proc.returncode}:\n{service.log_text()[-3000:]}")
        return service.ready() and (also is None or also())

    eventually_sync(ready, timeout=timeout, interval=0.05,
                    fail=lambda: RuntimeError(f"not ready within {timeout}s:\n{service.log_text()[-3000:]}"))


@contextmanager
def running_service(module: str, env: Mapping[str, str], port: int, log_path: Path, *,
                    ready_timeout: float = 20.0, also: Callable[[], bool] | None = None,
                    stop_timeout: float = 15.0) -> Iterator[Service]:
    """Run `python -m <module>` until the block ends; enter it once the service is ready."""
    service = spawn(module, env, port, log_path)
    try:
        wait_ready(service, timeout=ready_timeout, also=also)
        yield service
    finally:
        service.stop(stop_timeout)
