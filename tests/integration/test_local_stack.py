"""The supervised local stack (`make up` / `make down` / `make status`), end to end with real processes.

Covers the three breakages of the unsupervised stack: Redis coming back on a
new port after a crash (services stranded on the old one), crashed processes
never restarted, and Postgres failing to start from a checkout under a
private (0700) parent when run as root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis

from deploy.local.__main__ import print_status
from deploy.local.procs import pid_alive
from deploy.local.stack import DEFAULT_REPLICAS, ROOT, LocalStack, StackError, parse_replicas
from tests.support.eventually import eventually_sync

READY_WITHIN_S = 10  # the promise: /readyz back to 200 this soon after a dependency returns


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _wait(predicate, timeout: float, message: str) -> float:
    """Poll `predicate` until true; return the seconds it took."""
    started = time.monotonic()
    eventually_sync(predicate, timeout=timeout, interval=0.1, message=message)
    return time.monotonic() - started


def _service_ports(stack: LocalStack) -> dict[str, int]:
    return {name: row["port"] for name, row in stack.status().items()
            if name not in ("redis", "postgres", "kite_sim")}


def _all_ready(stack: LocalStack) -> bool:
    return all(_ready(port) for port in _service_ports(stack).values())


@contextmanager
def open_dir() -> Iterator[Path]:
    """A temp dir the `postgres` user can reach for the whole test.

    Not under pytest's base dir: a concurrent pytest session resets that to 0700.
    """
    path = Path(tempfile.mkdtemp(prefix="tickwise-stack-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    with open_dir() as base:
        stack = LocalStack(base / "run")  # default replicas, as `make up`
        stack.up()
        yield stack
        stack.down()


def test_up_runs_two_replicas_of_each_pipeline_service_by_default(stack: LocalStack,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    print_status(stack)  # `make status`
    shown = capsys.readouterr().out
    assert "executor-1" in shown and "running" in shown and stack.stack_env()["API_URL"] in shown
    status = stack.status()
    for service in ("executor", "scheduler", "market_listener"):
        assert [n for n in status if n.startswith(service + "-")] == [f"{service}-0", f"{service}-1"]
    assert all(row["state"] == "running" and row["pid"] and row["port"] for row in status.values()), status
    assert parse_replicas("executor=3,listener=4") == {**DEFAULT_REPLICAS, "executor": 3, "market_listener": 4}
    with pytest.raises(StackError):
        parse_replicas("executor=zero")


def test_redis_killed_comes_back_at_the_same_address_and_every_service_recovers(stack: LocalStack) -> None:
    env_before = (stack.run_dir / "stack.env").read_text()
    redis_port = stack.status()["redis"]["port"]
    old_pid = stack.pid_of("redis")
    os.kill(old_pid, signal.SIGKILL)  # its clients' connections linger in TIME_WAIT
    client = redis.Redis.from_url(stack.stack_env()["REDIS_URL"], socket_connect_timeout=0.5)

    def redis_answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    _wait(redis_answers, 30, "the supervisor did not restart Redis")
    assert stack.pid_of("redis") != old_pid
    assert stack.status()["redis"]["port"] == redis_port
    took = _wait(lambda: _all_ready(stack), READY_WITHIN_S, "a service stayed not-ready after Redis came back")
    print(f"all services ready {took:.1f}s after Redis answered again")
    stack.up()  # the repair command changes nothing on a healthy stack
    assert (stack.run_dir / "stack.env").read_text() == env_before


def test_crashed_processes_are_restarted_by_the_supervisor(stack: LocalStack) -> None:
    victims = {name: stack.pid_of(name) for name in ("api", "executor-1", "scheduler-0", "market_listener-1")}
    for pid in victims.values():
        os.kill(pid, signal.SIGKILL)
    for name, pid in victims.items():
        _wait(lambda name=name, pid=pid: stack.pid_of(name) not in (None, pid), 30, f"{name} was not restarted")
    _wait(lambda: _all_ready(stack), 60, "a restarted service did not become ready")
    status = stack.status()
    assert all(status[name]["restarts"] >= 1 for name in victims), status


def test_every_service_recovers_from_a_postgres_restart(stack: LocalStack) -> None:
    api_port = stack.status()["api"]["port"]
    stack.crash_postgres()  # pg_ctl stop -m immediate: stays down until started
    _wait(lambda: not _ready(api_port), 10, "the API stayed ready without Postgres")
    time.sleep(2)  # a real outage, not a blip: services notice Postgres is gone before it returns
    stack.start_program("postgres")
    stack.postgres().wait_ready()
    took = _wait(lambda: _all_ready(stack), READY_WITHIN_S, "a service stayed not-ready after Postgres came back")
    print(f"all services ready {took:.1f}s after Postgres accepted connections again")


def test_redis_and_postgres_refuse_clients_without_the_stack_credentials(stack: LocalStack) -> None:
    ports = {name: row["port"] for name, row in stack.status().items()}
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=ports["redis"]).xadd("queue:orders", {"event": "{}"})
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"host=127.0.0.1 port={ports['postgres']} user=postgres dbname=tickwise").close()
    # A service's own user can do its work but not administer the server.
    service_url = next(line.split("=", 1)[1] for line in (stack.supervisor.conf.read_text().splitlines())
                       if "REDIS_URL=" in line).split('REDIS_URL="', 1)[1].split('"', 1)[0]
    service = redis.Redis.from_url(service_url)
    assert service.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        service.flushall()
    for path in (stack.state_file, stack.run_dir / "stack.env", stack.supervisor.conf,
                 stack.run_dir / "redis" / "redis.conf"):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_a_second_up_and_the_demo_leave_a_running_stack_alone(stack: LocalStack) -> None:
    from deploy.demo import stop_what_demo_started

    pids = {name: row["pid"] for name, row in stack.status().items()}
    other = LocalStack(stack.run_dir)  # what `make demo` does with a `make up` stack
    other.up()
    assert not other.started_supervisor and other.started == []
    stop_what_demo_started(other)
    assert {name: row["pid"] for name, row in stack.status().items()} == pids


def test_up_repairs_what_is_missing_and_leaves_healthy_processes_alone(stack: LocalStack) -> None:
    stack.stop_program("executor-1")
    before = {name: row["pid"] for name, row in stack.status().items()}
    assert before["executor-1"] is None
    stack.up()
    after = {name: row["pid"] for name, row in stack.status().items()}
    assert after["executor-1"] and {k: v for k, v in after.items() if k != "executor-1"} == {
        k: v for k, v in before.items() if k != "executor-1"}

    # supervisord itself killed: its processes are orphans; `up` takes the stack back on the same ports.
    ports = {name: row["port"] for name, row in stack.status().items()}
    os.kill(stack.supervisor.pid(), signal.SIGKILL)
    stack.up()
    assert {name: row["port"] for name, row in stack.status().items()} == ports
    assert all(row["state"] == "running" for row in stack.status().values())
    _wait(lambda: _all_ready(stack), 60, "a service was not ready after the repair")


def test_down_leaves_no_process_and_up_brings_every_process_back_on_the_same_ports() -> None:
    with open_dir() as base:
        _down_and_up_again(LocalStack(base / "run"))


def _down_and_up_again(stack: LocalStack) -> None:
    env = stack.up(services=("kite_sim",))
    ports = {name: row["port"] for name, row in stack.status().items()}
    pids = [row["pid"] for row in stack.status().values()]
    stack.down()
    assert not any(pid_alive(pid) for pid in pids)
    assert stack._sweep_orphans() == []  # nothing of the stack left running
    stack.down()  # a second down is harmless
    assert (Path(stack.postgres().data_dir) / "PG_VERSION").exists(), "down must keep the data"
    try:
        again = stack.up(services=("kite_sim",))
        assert {name: row["port"] for name, row in stack.status().items()} == ports
        assert again == env or {k: v for k, v in again.items() if "MARKET_DATA" not in k} == {
            k: v for k, v in env.items() if "MARKET_DATA" not in k}
    finally:
        stack.down()


def test_a_port_taken_by_a_foreign_process_is_one_readable_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stack = LocalStack(run_dir)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    run_dir.mkdir()
    stack._save({"ports": {"redis": port}})  # a stack whose Redis port someone took since
    try:
        result = subprocess.run([sys.executable, "-m", "deploy.local", "up"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, env={**os.environ, "TICKWISE_RUN_DIR": str(run_dir)})
    finally:
        squatter.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"port {port} of redis is in use by pid {os.getpid()}" in result.stderr
    assert not stack.supervisor.running()


@pytest.mark.skipif(os.geteuid() != 0, reason="the postgres user only matters when running as root")
def test_postgres_starts_from_a_checkout_under_a_private_parent_as_root(tmp_path: Path) -> None:
    private = tmp_path / "home"
    private.mkdir()
    os.chmod(private, 0o700)  # like /root: the postgres user cannot traverse it
    # The checkout itself is private too: supervisord starts its programs there,
    # and the postgres user could not even chdir into it.
    stack = LocalStack(private / "tickwise" / ".run", workdir=private / "tickwise")
    try:
        env = stack.up(services=())
        data_dir = stack.postgres().data_dir
        with psycopg.connect(stack.postgres().dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("tickwise",)
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://postgres:")
        assert (stack.run_dir / "pg").resolve() == data_dir
    finally:
        stack.clean()
    assert not data_dir.exists(), "make clean leaves no relocated data behind"
