"""The local stack under `.run/`, every process supervised by supervisord.

`up` is idempotent and the repair command: it starts supervisord if it is not
running, applies the config (replica count, credentials), and starts every
program that is not running, in order, leaving running ones alone. Ports are
chosen once and kept in `state.json` while `.run/` exists, so a restarted
process comes back at the same address; a port held by a foreign process is
an error naming it. `down` stops every program and supervisord and keeps the
data; `make clean` wipes `.run/` (and a relocated Postgres data dir).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import redis

from deploy.local import credentials, leftovers
from deploy.local.leftovers import STACK_VAR
from deploy.local.procs import PostgresServer, free_port, redis_binary
from deploy.local.supervisor import Program, Supervisor, render_config
from libs.service.lifecycle import poll
from libs.service.secretbox import generate_key

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ("scheduler", "market_listener", "executor")
DEFAULT_REPLICAS = {"executor": 2, "scheduler": 2, "market_listener": 2}
PG_RELOCATED_ROOT = Path("/var/lib/tickwise")


class StackError(RuntimeError):
    """The stack could not be brought up; the message says what to do."""



def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from the first byte (it holds secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        out.write(text)


def parse_replicas(text: str | None) -> dict[str, int]:
    """Parse TICKWISE_REPLICAS (`executor=3,scheduler=2,listener=2`) over the defaults."""
    replicas = dict(DEFAULT_REPLICAS)
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, count = part.partition("=")
        name = {"listener": "market_listener"}.get(name.strip(), name.strip())
        if name not in replicas or not count.strip().isdigit() or int(count) < 1:
            raise StackError(f"TICKWISE_REPLICAS: cannot read {part.strip()!r} "
                             "(expected e.g. executor=3,scheduler=2,listener=2)")
        replicas[name] = int(count)
    return replicas


def service_of(program: str) -> str:
    """The service a program runs: `executor-1` -> `executor`."""
    base, _, index = program.rpartition("-")
    return base if index.isdigit() and base else program


def _reachable_by_others(path: Path) -> bool:
    return all(d.stat().st_mode & stat.S_IXOTH for d in [path, *path.parents] if d.exists())


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one Python process of the stack."""

    name: str
    module: str
    url_var: str | None = None  # written to stack.env, e.g. API_URL
    health_path: str = "/readyz"

    def present(self) -> bool:
        return (ROOT / self.module.replace(".", "/") / "__main__.py").exists()


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("kite_sim", "services.kite_sim", url_var="SIM_URL", health_path="/healthz"),
    ServiceSpec("api", "services.api", url_var="API_URL"),
    ServiceSpec("scheduler", "services.scheduler"),
    ServiceSpec("market_listener", "services.market_listener"),
    ServiceSpec("executor", "services.executor"),
)
_SPEC = {s.name: s for s in SERVICES}


class LocalStack:
    """Everything under one run directory (default `.run/`)."""

    def __init__(self, run_dir: Path | None = None, replicas: dict[str, int] | None = None,
                 workdir: Path = ROOT) -> None:
        self.run_dir = (run_dir or ROOT / ".run").resolve()
        self.workdir = workdir  # where supervisord and the Python processes start: the checkout
        self.state_file = self.run_dir / "state.json"
        self.logs = self.run_dir / "logs"
        self.supervisor = Supervisor(self.run_dir)
        self._replicas = replicas
        self.started_supervisor = False
        self.started: list[str] = []  # programs this object started (for `make demo`)

    # -- state -----------------------------------------------------------
    def _state(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {}

    def _save(self, state: dict) -> None:
        _write_private(self.state_file, json.dumps(state, indent=2))

    def _pg_data_dir(self, state: dict) -> Path:
        """`.run/pg`, or a directory the `postgres` user can reach when the checkout is private."""
        if "pg_data_dir" in state:
            return Path(state["pg_data_dir"])
        local = self.run_dir / "pg"
        if os.geteuid() != 0 or (local / "PG_VERSION").exists() or _reachable_by_others(self.run_dir):
            return local
        digest = hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:16]
        return PG_RELOCATED_ROOT / digest / "pg"

    def _postgres(self, state: dict) -> PostgresServer:
        return PostgresServer(self._pg_data_dir(state), state["ports"]["postgres"],
                              password=state["passwords"]["postgres"])

    # -- programs --------------------------------------------------------
    def _names(self, replicas: dict[str, int], services: tuple[str, ...] | None) -> list[str]:
        names = ["redis", "postgres"]
        for spec in SERVICES:
            if not spec.present() or (services is not None and spec.name not in services):
                continue
            if spec.name in PIPELINE:
                names += [f"{spec.name}-{i}" for i in range(replicas[spec.name])]
            else:
                names.append(spec.name)
        return names

    def _programs(self, state: dict, names: list[str]) -> list[Program]:
        ports, passwords = state["ports"], state["passwords"]
        pg = self._postgres(state)
        base = {STACK_VAR: str(self.run_dir)}
        common = {**base, **self._service_env(state)}
        programs = []
        for name in names:
            group = service_of(name)
            if name == "redis":
                programs.append(Program("redis", (redis_binary(), str(self.run_dir / "redis" / "redis.conf")),
                                        ports["redis"], 1, env=base))
            elif name == "postgres":
                programs.append(Program("postgres", tuple(pg.command()), ports["postgres"], 1, env=base,
                                        user="postgres" if os.geteuid() == 0 else None, stopsignal="INT",
                                        stopwaitsecs=60, autorestart="unexpected", directory=pg.data_dir))
            elif name == "kite_sim":
                # --state-file: paper accounts, tokens and orders survive restarts and `make down`/`make up`.
                programs.append(Program(name, (sys.executable, "-m", "services.kite_sim", "--port", str(ports[name]),
                                               "--state-file", str(self.run_dir / "kite_sim.state")),
                                        ports[name], 10, env=base))
            else:
                env = {**common, "REDIS_URL": credentials.redis_url(ports["redis"], passwords, group),
                       "TICKWISE_HEALTH_PORT": str(ports[name]), **state.get("program_env", {}).get(name, {})}
                programs.append(Program(name, (sys.executable, "-m", _SPEC[group].module), ports[name],
                                        20 if group == "api" else 30, env=env))
        return programs

    def _service_env(self, state: dict) -> dict[str, str]:
        ports = state["ports"]
        env = {
            "DATABASE_URL": self._postgres(state).url,
            "TICKWISE_SECRET_KEY": state["secret_key"],
            "TICKWISE_MARKET_CALENDAR": "always_open",
            "TICKWISE_LOG_FORMAT": "json",
        }
        if "kite_sim" in ports:
            env["TICKWISE_KITE_ROOT"] = f"http://127.0.0.1:{ports['kite_sim']}"
            env["TICKWISE_KITE_WS_ROOT"] = f"ws://127.0.0.1:{ports['kite_sim']}/ws"
        acct = state.get("market_data_account")
        if acct:
            env["TICKWISE_MARKET_DATA_API_KEY"] = acct["api_key"]
            env["TICKWISE_MARKET_DATA_ACCESS_TOKEN"] = acct["access_token"]
        return env

    def stack_env(self, state: dict | None = None) -> dict[str, str]:
        """The environment written to `.run/stack.env` (admin credentials, URLs)."""
        state = state or self._state()
        ports = state["ports"]
        env = {"REDIS_URL": credentials.redis_url(ports["redis"], state["passwords"]), **self._service_env(state)}
        for spec in SERVICES:
            if spec.url_var and spec.name in ports:
                env[spec.url_var] = f"http://127.0.0.1:{ports[spec.name]}"
        return env

    # -- up --------------------------------------------------------------
    def up(self, *, services: tuple[str, ...] | None = None) -> dict[str, str]:
        """Start whatever is not running; return the stack environment."""
        for d in (self.run_dir, self.logs, self.run_dir / "redis"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)
        state = self._state()
        state.setdefault("secret_key", generate_key())
        credentials.ensure_passwords(state)
        wanted = os.environ.get("TICKWISE_REPLICAS")
        replicas = (self._replicas or (parse_replicas(wanted) if wanted else None) or state.get("replicas")
                    or dict(DEFAULT_REPLICAS))
        state["replicas"] = replicas
        names = self._names(replicas, services)
        ports = state.setdefault("ports", {})
        for name in names:
            ports.setdefault(name, free_port())
        state["pg_data_dir"] = str(self._pg_data_dir(state))
        self._save(state)

        if not self.supervisor.running():
            leftovers.stop_legacy(self.run_dir, legacy_pg="programs" not in state)
            for name in names:  # before anything starts: a clash leaves nothing half up
                self._check_port(name, ports[name])
        pg = self._postgres(state)
        self._prepare_postgres_dir(pg)
        _write_private(self.run_dir / "redis" / "redis.conf", credentials.redis_conf(
            port=ports["redis"], data_dir=self.run_dir / "redis", passwords=state["passwords"]))
        self._apply_config(state, names)

        spawned = self.supervisor.spawn_counts().get("postgres", 0)
        self._start(["redis", "postgres"], state)
        self._wait_redis(state)
        try:
            pg.wait_ready(alive=lambda: self.supervisor.spawn_counts().get("postgres", 0) <= spawned + 3)
        except RuntimeError as exc:
            raise StackError(f"{exc}; {self._last_line('postgres')}") from None
        pg.create_database()
        from libs.schema.migrate import upgrade_head

        upgrade_head(pg.url)
        if "kite_sim" in names:
            self._start(["kite_sim"], state)
            if self._ensure_market_data_account(state):
                self._save(state)
                self._apply_config(state, names)
        rest = [n for n in names if n not in ("redis", "postgres", "kite_sim")]
        self._start(rest, state)
        env = self.stack_env(state)
        _write_private(self.run_dir / "stack.env", "".join(f"{k}={v}\n" for k, v in env.items()))
        return env

    def _prepare_postgres_dir(self, pg: PostgresServer) -> None:
        if pg.data_dir != self.run_dir / "pg":
            for d in (pg.data_dir.parent.parent, pg.data_dir.parent):
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o755)
            link = self.run_dir / "pg"
            if not link.is_symlink() and not link.exists():
                link.symlink_to(pg.data_dir)
        pg.init()
        pg.socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(pg.socket_dir, "postgres", "postgres")

    def _apply_config(self, state: dict, names: list[str]) -> None:
        state["programs"] = names
        self._save(state)
        conf = render_config(self.run_dir, self.supervisor.socket, self._programs(state, self._ordered(names)),
                             self.workdir)
        _write_private(self.supervisor.conf, conf)
        if self.supervisor.running():
            self.supervisor.update()
        else:
            self._sweep_orphans()
            self.supervisor.start()
            self.started_supervisor = True

    @staticmethod
    def _ordered(names: list[str]) -> list[str]:
        order = ["redis", "postgres", *(s.name for s in SERVICES)]
        return sorted(names, key=lambda n: order.index(service_of(n)))

    @staticmethod
    def _rpc_name(name: str) -> str:
        return f"{name}:{name}"

    def _start(self, names: list[str], state: dict) -> None:
        """Start the programs that are not running (port checked first), then wait for all to be ready."""
        info = self.supervisor.info()
        for name in names:
            if info.get(name, {}).get("statename") in ("RUNNING", "STARTING", "BACKOFF"):
                continue
            self._check_port(name, state["ports"][name])
            self.supervisor.start_program(self._rpc_name(name))
            self.started.append(name)
            print(f"tickwise: {name:<18} started (port {state['ports'][name]})", flush=True)
        for name in names:
            group = service_of(name)
            if group in _SPEC:
                self._wait_http(name, state["ports"][name], _SPEC[group].health_path)

    def _data_dirs(self) -> set[Path]:
        state = self._state()
        return {self.run_dir / "redis", self.run_dir / "pg", *([Path(state["pg_data_dir"])]
                                                               if "pg_data_dir" in state else [])}

    def _check_port(self, name: str, port: int) -> None:
        leftovers.claim_port(name, port, self.run_dir, self._data_dirs())

    def _sweep_orphans(self) -> list[int]:
        return leftovers.sweep_orphans(self.run_dir, self._data_dirs())

    def _wait_redis(self, state: dict, timeout: float = 30.0) -> None:
        client = redis.Redis.from_url(credentials.redis_url(state["ports"]["redis"], state["passwords"]),
                                      socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.AuthenticationError:
                raise StackError("redis refused the stack's password; see .run/logs/redis.log") from None
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                return False

        if not poll(answers, timeout=timeout, interval=0.1):
            raise StackError(f"redis did not answer in {timeout:.0f}s; {self._last_line('redis')}")

    def _wait_http(self, name: str, port: int, path: str, timeout: float = 60.0) -> None:
        spawned = self.supervisor.spawn_counts().get(name, 0)

        def ready() -> bool:
            if self.supervisor.spawn_counts().get(name, 0) > spawned + 2:
                raise StackError(f"{name} keeps exiting at start; {self._last_line(name)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                    return resp.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        if not poll(ready, timeout=timeout, interval=0.2):
            raise StackError(f"{name} not ready after {timeout:.0f}s; {self._last_line(name)}")

    def _last_line(self, name: str) -> str:
        log = self.logs / f"{name}.log"
        try:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        last = f"last log line: {lines[-1][:200]!r}; " if lines else ""
        return f"{last}see {log}"

    def _ensure_market_data_account(self, state: dict) -> bool:
        """Make sure the simulator knows the listener's paper account; return True if it was (re)created."""
        sim_url = f"http://127.0.0.1:{state['ports']['kite_sim']}"
        acct = state.get("market_data_account")
        if acct:
            probe = urllib.request.Request(f"{sim_url}/user/profile", headers={
                "X-Kite-Version": "3", "Authorization": f"token {acct['api_key']}:{acct['access_token']}"})
            try:
                with urllib.request.urlopen(probe, timeout=5):
                    return False
            except urllib.error.HTTPError:
                pass  # a restarted simulator forgot it
        req = urllib.request.Request(f"{sim_url}/sim/accounts", data=b'{"user_name": "market-data"}',
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = json.loads(resp.read())
        state["market_data_account"] = {"api_key": body["api_key"], "access_token": body["access_token"]}
        return True

    # -- replicas and single programs (operators, tests, chaos) -----------
    def instances(self, group: str) -> list[str]:
        """Names of the running configuration's programs of `group` (e.g. executor-0, executor-1)."""
        return [n for n in self._state().get("programs", []) if service_of(n) == group]

    def add_replica(self, group: str, env: dict[str, str] | None = None) -> str:
        """Run one more replica of a pipeline service, with `env` on top of its own; return its program name."""
        state = self._state()
        replicas = dict(self._replicas or state.get("replicas") or DEFAULT_REPLICAS)
        replicas[group] += 1
        name = f"{group}-{replicas[group] - 1}"
        if env:
            state.setdefault("program_env", {})[name] = dict(env)
            self._save(state)
        self._replicas = replicas
        self.up()
        return name

    def pid_of(self, name: str) -> int | None:
        """Pid of a running program (a bare service name means its first replica)."""
        if name in PIPELINE:
            name = f"{name}-0"
        try:
            pid = self.supervisor.info().get(name, {}).get("pid")
        except (OSError, ConnectionError):
            return None
        return pid or None

    def stop_program(self, name: str) -> None:
        self.supervisor.stop_program(self._rpc_name(name))

    def start_program(self, name: str) -> None:
        self.supervisor.start_program(self._rpc_name(name))

    def postgres(self) -> PostgresServer:
        """The stack's Postgres (admin credentials)."""
        return self._postgres(self._state())

    def crash_postgres(self) -> None:
        """Stop Postgres hard (`pg_ctl stop -m immediate`); it stays down until `up` or start_program."""
        self.postgres().stop(mode="immediate")

    # -- down / status / clean --------------------------------------------
    def down(self) -> None:
        """Stop every program and supervisord; keep the data. Leaves no process of the stack behind."""
        if self.supervisor.shutdown():
            print("tickwise: stack stopped (data kept in .run/)", flush=True)
        elif self.run_dir.exists():
            leftovers.stop_legacy(self.run_dir, legacy_pg="programs" not in self._state())
        swept = self._sweep_orphans()
        if swept:
            print(f"tickwise: stopped {len(swept)} orphaned process(es)", flush=True)

    def clean(self) -> None:
        """down, then delete the run dir and a relocated Postgres data dir."""
        state = self._state()
        self.down()
        relocated = state.get("pg_data_dir")
        if relocated and Path(relocated).parent.parent == PG_RELOCATED_ROOT:
            shutil.rmtree(Path(relocated).parent, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def status(self) -> dict[str, dict]:
        """State, pid, port, uptime and restarts of each program (empty states when supervisord is down)."""
        state = self._state()
        ports = state.get("ports", {})
        out: dict[str, dict] = {}
        info = self.supervisor.info() if self.supervisor.running() else {}
        spawns = self.supervisor.spawn_counts() if info else {}
        for name in state.get("programs", []):
            p = info.get(name, {})
            running = p.get("statename") == "RUNNING"
            out[name] = {
                "state": p.get("statename", "DOWN").lower(),
                "pid": p.get("pid") or None,
                "port": ports.get(name),
                "uptime_s": int(p["now"] - p["start"]) if running else 0,
                "restarts": max(0, spawns.get(name, 0) - 1),
            }
        return out
