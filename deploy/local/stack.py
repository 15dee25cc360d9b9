"""The local stack under `.run/`: private Redis and Postgres, the Kite simulator, the services.

`up` is idempotent (what runs is left running), `down` stops exactly what `up`
started (pid files) and keeps data; `make clean` wipes `.run/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.procs import PostgresServer, RedisServer, free_port, pid_alive, port_is_free, stop_pid
from libs.service.secretbox import generate_key

ROOT = Path(__file__).resolve().parents[2]


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from the first byte (it holds the secret key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        out.write(text)


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one Python process of the stack."""

    name: str
    module: str
    url_var: str | None = None  # written to stack.env, e.g. API_URL
    port_arg: bool = False  # takes --port instead of TICKWISE_HEALTH_PORT
    env: dict[str, str] = field(default_factory=dict)

    def present(self) -> bool:
        return (ROOT / self.module.replace(".", "/") / "__main__.py").exists()


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("kite_sim", "services.kite_sim", url_var="SIM_URL", port_arg=True),
    ServiceSpec("api", "services.api", url_var="API_URL"),
    ServiceSpec("scheduler", "services.scheduler"),
    ServiceSpec("market_listener", "services.market_listener"),
    ServiceSpec("executor", "services.executor"),
)


class LocalStack:
    """Everything under one run directory (default `.run/`)."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self.run_dir = (run_dir or ROOT / ".run").resolve()
        self.state_file = self.run_dir / "state.json"
        self.logs = self.run_dir / "logs"
        self.pids = self.run_dir / "pids"
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- state -----------------------------------------------------------
    def _state(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {}

    def _save(self, state: dict) -> None:
        _write_private(self.state_file, json.dumps(state, indent=2))

    def _port(self, state: dict, name: str, running: bool | None = None) -> int:
        """Reuse the port this stack had, if it is free or ours; else pick a new one."""
        ports = state.setdefault("ports", {})
        port = ports.get(name)
        ours = self._owns(name) if running is None else running
        if port is None or (not port_is_free(port) and not ours):
            port = free_port()
        ports[name] = port
        return port

    def _owns(self, name: str) -> bool:
        pid = self._pid(name)
        return pid is not None and pid_alive(pid)

    def _pid(self, name: str) -> int | None:
        f = self.pids / f"{name}.pid"
        try:
            return int(f.read_text())
        except (OSError, ValueError):
            return None

    # -- up --------------------------------------------------------------
    def up(self, *, services: tuple[str, ...] | None = None) -> dict[str, str]:
        """Start whatever is not running; return the stack environment."""
        for d in (self.run_dir, self.logs, self.pids):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)
        state = self._state()
        secret = state.setdefault("secret_key", generate_key())
        redis_dir, pg_dir = self.run_dir / "redis", self.run_dir / "pg"
        redis_srv = RedisServer(redis_dir, self._port(state, "redis", RedisServer(redis_dir, 0).is_running()))
        pg = PostgresServer(pg_dir, self._port(state, "postgres", PostgresServer(pg_dir, 0).is_running()))
        self._save(state)
        if not self._redis_up(redis_srv):
            redis_srv.start(appendonly=True)
            print(f"tickwise: redis      {redis_srv.url}")
        if not pg.is_running():
            pg.start()
            print(f"tickwise: postgres   {pg.url}")
        from libs.schema.migrate import upgrade_head

        upgrade_head(pg.url)
        env = {
            "REDIS_URL": redis_srv.url,
            "DATABASE_URL": pg.url,
            "TICKWISE_SECRET_KEY": secret,
            "TICKWISE_MARKET_CALENDAR": "always_open",
            "TICKWISE_LOG_FORMAT": "json",
        }
        wanted = [s for s in SERVICES if s.present() and (services is None or s.name in services)]
        for spec in wanted:
            port = self._port(state, spec.name)
            self._save(state)
            if spec.url_var:
                env[spec.url_var] = f"http://127.0.0.1:{port}"
            if spec.name == "kite_sim":
                env["TICKWISE_KITE_ROOT"] = env["SIM_URL"]
                env["TICKWISE_KITE_WS_ROOT"] = f"ws://127.0.0.1:{port}/ws"
            if not self._owns(spec.name):
                self._spawn(spec, port, env)
                print(f"tickwise: {spec.name:<10} started (port {port})")
            self._wait_ready(spec.name, port)
            if spec.name == "kite_sim":
                env.update(self._market_data_account(state, env["SIM_URL"]))
                self._save(state)
        self._write_env(env)
        return env

    @staticmethod
    def _redis_up(srv: RedisServer) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=srv.port, socket_connect_timeout=0.3).ping())
        except redis.RedisError:
            return False

    def spawn_replica(self, name: str, replica: int, env: dict[str, str],
                      extra_env: dict[str, str] | None = None) -> tuple[str, int]:
        """Start one more instance of a pipeline service; return (instance name, health port)."""
        spec = next(s for s in SERVICES if s.name == name)
        instance = f"{name}-{replica}"
        port = free_port()
        self._spawn(spec, port, {**env, **(extra_env or {})}, instance=instance)
        self._wait_ready(instance, port)
        return instance, port

    def pid_of(self, instance: str) -> int | None:
        """Return the pid of a running instance (service name or replica name)."""
        return self._pid(instance)

    def _spawn(self, spec: ServiceSpec, port: int, env: dict[str, str], instance: str | None = None) -> None:
        instance = instance or spec.name
        cmd = [sys.executable, "-m", spec.module]
        proc_env = {**os.environ, **env, **spec.env}
        if spec.port_arg:
            cmd += ["--port", str(port)]
        if spec.name == "kite_sim":  # paper accounts, tokens and orders survive `make down`/`make up`
            cmd += ["--state-file", str(self.run_dir / "kite_sim.state")]
        else:
            proc_env["TICKWISE_HEALTH_PORT"] = str(port)
        log = open(self.logs / f"{instance}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(cmd, cwd=ROOT, env=proc_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._children[instance] = proc
        (self.pids / f"{instance}.pid").write_text(str(proc.pid))

    def _wait_ready(self, name: str, port: int, timeout: float = 30.0) -> None:
        path = "/healthz" if name == "kite_sim" else "/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self._pid(name)
            if pid is None or not pid_alive(pid):
                raise RuntimeError(f"{name} exited during start; see {self.logs / (name + '.log')}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout:.0f}s; see {self.logs / (name + '.log')}")

    def _market_data_account(self, state: dict, sim_url: str) -> dict[str, str]:
        """Create (once per simulator start) the paper account the listener reads ticks with."""
        sim_pid = self._pid("kite_sim")
        acct = state.get("market_data_account")
        if not acct or acct.get("sim_pid") != sim_pid:
            req = urllib.request.Request(f"{sim_url}/sim/accounts", data=b'{"user_name": "market-data"}',
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=5) as resp:
                body = json.loads(resp.read())
            acct = {"api_key": body["api_key"], "access_token": body["access_token"], "sim_pid": sim_pid}
            state["market_data_account"] = acct
        return {"TICKWISE_MARKET_DATA_API_KEY": acct["api_key"],
                "TICKWISE_MARKET_DATA_ACCESS_TOKEN": acct["access_token"]}

    def _write_env(self, env: dict[str, str]) -> None:
        lines = [f"{k}={v}" for k, v in env.items()]
        _write_private(self.run_dir / "stack.env", "\n".join(lines) + "\n")

    # -- down / status ---------------------------------------------------
    def down(self) -> None:
        """Stop the services, then Postgres and Redis; keep the data."""
        state = self._state()
        for spec in reversed(SERVICES):
            instances = sorted(p.stem for p in self.pids.glob(f"{spec.name}*.pid")) if self.pids.exists() else []
            for instance in instances:
                pid = self._pid(instance)
                if pid is not None and stop_pid(pid, timeout=15):
                    print(f"tickwise: {instance:<10} stopped")
                (self.pids / f"{instance}.pid").unlink(missing_ok=True)
        for proc in self._children.values():
            proc.poll()  # reap children started by this object (tests), so no zombies linger
        self._children.clear()
        ports = state.get("ports", {})
        if "postgres" in ports:
            pg = PostgresServer(self.run_dir / "pg", ports["postgres"])
            if pg.is_running():
                pg.stop()
                print("tickwise: postgres   stopped")
        if "redis" in ports:
            srv = RedisServer(self.run_dir / "redis", ports["redis"])
            if srv.is_running():
                srv.stop()
                print("tickwise: redis      stopped")

    def status(self) -> dict[str, str]:
        state = self._state()
        out: dict[str, str] = {}
        ports = state.get("ports", {})
        if "redis" in ports:
            out["redis"] = "up" if self._redis_up(RedisServer(self.run_dir / "redis", ports["redis"])) else "down"
        if "postgres" in ports:
            out["postgres"] = "up" if PostgresServer(self.run_dir / "pg", ports["postgres"]).is_running() else "down"
        for spec in SERVICES:
            if spec.present():
                out[spec.name] = "up" if self._owns(spec.name) else "down"
        return out
