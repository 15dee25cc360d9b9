"""Start and stop private redis-server and Postgres instances on loopback.

Used by the local stack (`python -m deploy.local up`) and by the test fixtures,
so both run the very same servers the same way. Postgres refuses to run as
root, so as root its programs run as the `postgres` system user.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); ask /proc for its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def stop_pid(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Send `sig`, wait up to `timeout`, then SIGKILL. Return True if it was running."""
    if not pid_alive(pid):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def redis_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(found):
        raise RuntimeError("redis-server not found: run `make install` (Debian package redis-server)")
    return found


def pg_bindir() -> Path:
    """Return the newest /usr/lib/postgresql/*/bin that has initdb."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise RuntimeError("PostgreSQL server not found: run `make install` (Debian package postgresql)")
    return Path(candidates[-1]).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _chown_for_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


@dataclass
class RedisServer:
    data_dir: Path
    port: int
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, appendonly: bool = True, extra: list[str] | None = None) -> None:
        """Start daemonised with AOF (appendfsync everysec); wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pidfile = self.data_dir / "redis.pid"
        args = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--daemonize", "yes", "--pidfile", str(pidfile), "--logfile", str(self.data_dir / "redis.log"),
            "--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
            "--protected-mode", "yes", *(extra or []),
        ]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        self._wait_ready(pidfile)

    def _wait_ready(self, pidfile: Path, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    self.pid = int(pidfile.read_text().strip())
                    return
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer; see {self.data_dir}/redis.log")

    def _pid_from_file(self) -> int | None:
        try:
            return int((self.data_dir / "redis.pid").read_text())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        """Return True if the server this data dir belongs to is alive (by its pid file)."""
        pid = self.pid or self._pid_from_file()
        return pid is not None and pid_alive(pid)

    def stop(self, *, kill: bool = False) -> None:
        pid = self.pid or self._pid_from_file()
        if pid:
            stop_pid(pid, sig=signal.SIGKILL if kill else signal.SIGTERM)
        (self.data_dir / "redis.pid").unlink(missing_ok=True)
        self.pid = None


@dataclass
class PostgresServer:
    data_dir: Path
    port: int
    database: str = "tickwise"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir.parent / (self.data_dir.name + "-sock")

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        """libpq connection string."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={self.database}"

    def init(self) -> None:
        """initdb (trust auth for loopback only) unless the cluster already exists."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _chown_for_postgres(self.data_dir)
        os.chmod(self.data_dir, 0o700)
        subprocess.run(
            _as_postgres([str(pg_bindir() / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                          "--auth-local=trust", "--auth-host=trust", "-E", "UTF8", "--no-instructions"]),
            check=True, stdout=subprocess.DEVNULL,
        )
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
        )

    def start(self, *, fsync: bool = True) -> None:
        """Start with pg_ctl, wait until it accepts connections, create the database."""
        self.init()
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        _chown_for_postgres(self.socket_dir)
        opts = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        if not fsync:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        subprocess.run(
            _as_postgres([str(pg_bindir() / "pg_ctl"), "-D", str(self.data_dir), "-l",
                          str(self.data_dir / "postgres.log"), "-o", opts, "-w", "-t", "60", "start"]),
            check=True, stdout=subprocess.DEVNULL,
        )
        self._create_database()

    def _create_database(self) -> None:
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def is_running(self) -> bool:
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return False
        try:
            return pid_alive(int(pidfile.read_text().splitlines()[0]))
        except (ValueError, IndexError, OSError):
            return False

    def stop(self, *, mode: str = "fast") -> None:
        """Stop: mode `fast` (clean), or `immediate` (a crash, as after kill -9)."""
        if not self.is_running():
            return
        subprocess.run(
            _as_postgres([str(pg_bindir() / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"]),
            check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
