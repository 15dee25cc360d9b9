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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
from psycopg import sql

from libs.service.lifecycle import poll


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Return True if a listener could bind 127.0.0.1:`port` now.

    SO_REUSEADDR, as redis-server, Postgres and aiohttp bind: a port whose old
    connections linger in TIME_WAIT is free, only a live listener takes it.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def port_holder(port: int) -> tuple[int, str] | None:
    """Return (pid, command line) of the process listening on `port`, if it can be seen."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return int(proc.name), cmd
        except OSError:
            continue
    return None


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
    if poll(lambda: not pid_alive(pid), timeout=timeout, interval=0.05):
        return True
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
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def answered() -> bool:
            try:
                if client.ping():
                    self.pid = int(pidfile.read_text().strip())
                    return True
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError, ValueError):
                pass
            return False

        if not poll(answered, timeout=timeout, interval=0.05):
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
    """One Postgres cluster on loopback: trust auth (test fixtures) or scram with `password` (the stack)."""

    data_dir: Path
    port: int
    database: str = "tickwise"
    password: str | None = None

    @property
    def socket_dir(self) -> Path:
        return self.data_dir.parent / (self.data_dir.name + "-sock")

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver)."""
        auth = f"postgres:{self.password}" if self.password else "postgres"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        """libpq connection string."""
        return self._dsn(self.database)

    def _dsn(self, database: str, *, with_password: bool = True) -> str:
        dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"
        return dsn + (f" password={self.password}" if self.password and with_password else "")

    def _hba(self) -> str:
        method = "scram-sha-256" if self.password else "trust"
        return f"local all all {method}\nhost all all 127.0.0.1/32 {method}\nhost all all ::1/128 {method}\n"

    def init(self) -> None:
        """initdb (loopback only: trust, or scram-sha-256 with `password`) unless the cluster exists."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _chown_for_postgres(self.data_dir)
        os.chmod(self.data_dir, 0o700)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        _chown_for_postgres(self.socket_dir)
        os.chmod(self.socket_dir, 0o700)
        auth = ["--auth-local=trust", "--auth-host=trust"]
        pwfile = self.socket_dir / "initdb.pw"
        if self.password:
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(self.password + "\n")
            _chown_for_postgres(pwfile)
            auth = ["--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            subprocess.run(
                _as_postgres([str(pg_bindir() / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                              *auth, "-E", "UTF8", "--no-instructions"]),
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"initdb failed: {detail[0] if detail else exc}") from None
        finally:
            pwfile.unlink(missing_ok=True)
        (self.data_dir / "pg_hba.conf").write_text(self._hba())

    def command(self) -> list[str]:
        """The postmaster in the foreground, as a process supervisor runs it."""
        return [str(pg_bindir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1"]

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
        self.create_database()

    def wait_ready(self, timeout: float = 60.0, *, alive: Callable[[], bool] | None = None) -> None:
        """Wait until the server accepts a connection (a password is refused until then too)."""
        def accepts() -> bool:
            try:
                with psycopg.connect(self._dsn("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError as exc:
                if "password authentication failed" in str(exc) or "no password supplied" in str(exc):
                    if self._adopt_password():
                        return accepts()
                    raise RuntimeError("Postgres refused the stack's password: remove .run/ "
                                       "(make clean) to start over") from None
                if alive is not None and not alive():
                    raise RuntimeError(f"Postgres on port {self.port} exited before accepting connections") from None
                return False

        if not poll(accepts, timeout=timeout, interval=0.2):
            raise RuntimeError(f"Postgres on port {self.port} did not accept connections")

    def _adopt_password(self) -> bool:
        """A cluster made before passwords (trust auth): set the password, switch pg_hba to scram."""
        hba = self.data_dir / "pg_hba.conf"
        if not self.password or " trust" not in hba.read_text():
            return False
        try:
            with psycopg.connect(self._dsn("postgres", with_password=False), autocommit=True) as conn:
                conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(self.password)))
                hba.write_text(self._hba())
                conn.execute("SELECT pg_reload_conf()")
        except psycopg.OperationalError:
            return False
        time.sleep(0.5)
        return True

    def create_database(self) -> None:
        """Create `database` unless it exists."""
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
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
