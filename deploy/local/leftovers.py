"""Whatever of a stack runs outside its supervisord: orphans, port squatters, an older pid-file stack.

A supervisord killed with -9 leaves its programs running; `up` recognises them
as this stack's (an environment marker, or for Redis and Postgres, which
overwrite theirs with their process title, their working directory) and stops
them before starting afresh, so nothing runs twice and the ports stay the same.
A port held by anything else is an error naming it.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from deploy.local.procs import PostgresServer, pid_alive, port_holder, port_is_free

STACK_VAR = "TICKWISE_STACK_DIR"
"""Set in every supervised process: finds processes orphaned by a killed supervisord."""


class PortTaken(RuntimeError):
    """A port of the stack is held by a process that is not part of it."""


def claim_port(name: str, port: int, run_dir: Path, data_dirs: set[Path]) -> None:
    """Return if `port` is free (or held by an orphan of this stack, now stopped); else raise naming its holder."""
    if port_is_free(port):
        return
    holder = port_holder(port)
    if holder and is_ours(holder[0], run_dir, data_dirs):
        terminate(holder[0])
        if port_is_free(port):
            return
    who = f"pid {holder[0]} ({holder[1][:80]})" if holder else "another process"
    raise PortTaken(f"port {port} of {name} is in use by {who}; stop it, or run `make clean` "
                     "to give this stack new ports")


def is_ours(pid: int, run_dir: Path, data_dirs: set[Path]) -> bool:
    """Return True for a process of this stack: marked in its environment, or working in its data dirs."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    if f"{STACK_VAR}={run_dir}".encode() in environ:
        return True
    return cwd in data_dirs


def sweep_orphans(run_dir: Path, data_dirs: set[Path]) -> list[int]:
    """Stop processes of this stack left running by a supervisord that died (kill -9)."""
    found = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()
             and is_ours(int(p.name), run_dir, data_dirs)]
    for pid in found:
        terminate(pid)
    return found


def stop_legacy(run_dir: Path, *, legacy_pg: bool) -> None:
    """Stop a stack started by the pid-file `make up` of earlier versions (kept data is reused)."""
    pids = run_dir / "pids"
    legacy = [pids / p.name for p in pids.glob("*.pid")] if pids.is_dir() else []
    legacy.append(run_dir / "redis" / "redis.pid")
    for pidfile in legacy:
        try:
            terminate(int(pidfile.read_text().strip()))
        except (OSError, ValueError):
            pass
        pidfile.unlink(missing_ok=True)
    old_pg = run_dir / "pg"
    if legacy_pg and (old_pg / "postmaster.pid").exists():
        PostgresServer(old_pg, 0).stop(mode="fast")
    if pids.is_dir():
        shutil.rmtree(pids, ignore_errors=True)


def terminate(pid: int, timeout: float = 20.0) -> None:
    """SIGINT (fast shutdown for Postgres, clean for the others), then SIGKILL."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
