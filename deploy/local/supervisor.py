"""supervisord for the local stack: its config under `.run/`, and a small XML-RPC client.

Why supervisord: a well-kept, widely deployed process supervisor on PyPI,
pure Python (installs with the rest of requirements.lock, no system
package), restarts crashed processes, runs one program as another user
(Postgres as `postgres` under root), and answers state, pid and start time
over XML-RPC on a private unix socket, which `make status` shows.

Restart policy: every program has `autorestart=true` and a very large
`startretries`, so a crashing process is restarted for the whole trading day
(supervisord waits 1 s, 2 s, 3 s, ... between attempts that die within
`startsecs`, and restarts at once a process that ran longer). Postgres is
restarted after a crash (killed by a signal) but not after a clean exit: an
operator's `pg_ctl stop` (any mode) keeps it down until `make up`. Programs are
not auto-started with supervisord: `up` starts them in order (Redis and
Postgres, migrations, simulator, API, pipeline) and waits for each to be ready.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.procs import pid_alive

RESTART_FOREVER = 1_000_000
"""startretries: in effect, never give up during a trading day."""


@dataclass(frozen=True)
class Program:
    """One supervised process."""

    name: str  # e.g. "redis", "api", "executor-1"; each program is its own supervisord group,
    # so adding or removing a replica leaves the other replicas running.
    command: tuple[str, ...]
    port: int
    priority: int
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    stopsignal: str = "TERM"
    stopwaitsecs: int = 20
    autorestart: str = "true"  # "unexpected": not after a clean exit (0), e.g. `pg_ctl stop`
    # Where it starts; None: the checkout. A program run as another user needs a
    # directory that user can enter: a checkout under /root is not one.
    directory: Path | None = None


def _quote(value: str) -> str:
    # supervisord expands %(name)s in values, so a literal % is doubled.
    return '"' + value.replace("%", "%%").replace('"', '\\"') + '"'


def _arg(value: str) -> str:
    return value.replace("%", "%%") if " " not in value else _quote(value)


def render_config(run_dir: Path, socket_path: Path, programs: list[Program], workdir: Path) -> str:
    """Return supervisord.conf for `programs`."""
    logs = run_dir / "logs"
    out = [
        "[unix_http_server]", f"file={socket_path}", "chmod=0700", "",
        "[supervisord]", f"logfile={logs / 'supervisord.log'}", "logfile_maxbytes=0",
        f"pidfile={run_dir / 'supervisord.pid'}", f"childlogdir={logs}", f"directory={workdir}",
        "identifier=tickwise", "nodaemon=false", "umask=022", "",
        "[rpcinterface:supervisor]", "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "", "[supervisorctl]", f"serverurl=unix://{socket_path}", "",
    ]
    for p in programs:
        out += [
            f"[program:{p.name}]", "command=" + " ".join(_arg(a) for a in p.command),
            f"directory={p.directory or workdir}",
            "autostart=false", f"autorestart={p.autorestart}", "exitcodes=0", "startsecs=1", f"startretries={RESTART_FOREVER}",
            f"priority={p.priority}", f"stopsignal={p.stopsignal}", f"stopwaitsecs={p.stopwaitsecs}",
            "stopasgroup=true", "killasgroup=true", "redirect_stderr=true",
            f"stdout_logfile={logs / (p.name + '.log')}", "stdout_logfile_maxbytes=50MB", "stdout_logfile_backups=2",
        ]
        if p.user:
            out.append(f"user={p.user}")
        if p.env:
            out.append("environment=" + ",".join(f"{k}={_quote(v)}" for k, v in sorted(p.env.items())))
        out.append("")
    return "\n".join(out)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self._path, self._timeout = path, timeout

    def make_connection(self, host: object) -> http.client.HTTPConnection:
        return _UnixHTTPConnection(self._path, self._timeout)


def socket_path_for(run_dir: Path) -> Path:
    """The control socket: in the run dir unless that path is too long for a unix socket."""
    path = run_dir / "supervisor.sock"
    if len(str(path)) < 100:
        return path
    return Path("/tmp") / f"tickwise-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]}.sock"


class Supervisor:
    """The stack's supervisord: start it, talk to it, shut it down."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.conf = run_dir / "supervisord.conf"
        self.pidfile = run_dir / "supervisord.pid"
        self.socket = socket_path_for(run_dir)
        self.log = run_dir / "logs" / "supervisord.log"

    def rpc(self, timeout: float = 30.0) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(str(self.socket), timeout))

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def running(self) -> bool:
        if self.pid() is None:
            return False
        try:
            return self.rpc(timeout=5).supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def start(self) -> None:
        """Start supervisord (it daemonises) and wait until it answers."""
        done = subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode != 0:
            detail = [ln for ln in done.stderr.decode(errors="replace").splitlines() if ln.strip()]
            raise RuntimeError(f"supervisord did not start: {detail[-1] if detail else done.returncode}")
        deadline = time.monotonic() + 20
        while not self.running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not start; see {self.log}")
            time.sleep(0.1)

    def update(self) -> None:
        """Apply a changed config: add new groups, re-add changed ones, remove old ones (as `supervisorctl update`)."""
        server = self.rpc().supervisor
        added, changed, removed = server.reloadConfig()[0]
        for group in removed + changed:
            server.stopProcessGroup(group)
            server.removeProcessGroup(group)
        for group in changed + added:
            server.addProcessGroup(group)

    def info(self) -> dict[str, dict]:
        """Return process info by program name (state, pid, start, now, ...)."""
        return {p["name"]: p for p in self.rpc().supervisor.getAllProcessInfo()}

    def start_program(self, rpc_name: str) -> None:
        try:
            self.rpc().supervisor.startProcess(rpc_name, False)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise

    def stop_program(self, rpc_name: str) -> None:
        try:
            self.rpc(timeout=90).supervisor.stopProcess(rpc_name, True)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString:
                raise

    def shutdown(self, timeout: float = 120.0) -> bool:
        """Stop every program, then supervisord; return True if it was running."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            self.rpc().supervisor.shutdown()
        except (OSError, xmlrpc.client.Error):
            os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return True

    def spawn_counts(self) -> dict[str, int]:
        """Count starts per program since supervisord started (from its log)."""
        counts: dict[str, int] = {}
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return counts
        for line in lines:
            if "supervisord started with pid" in line:
                counts.clear()
            elif " spawned: '" in line:
                name = line.split(" spawned: '", 1)[1].split("'", 1)[0]
                counts[name] = counts.get(name, 0) + 1
        return counts
