"""`python -m services.api` as a real process: readiness, JSON logs, SIGTERM exit 0, refusal without a key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import orjson

from deploy.local.procs import free_port
from tests.integration.api_support import REPO_ROOT, SECRET_KEY, run_api_process
from tests.support.eventually import eventually_sync


def base_env(redis_url: str, database_url: str, sim_url: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "TICKWISE_SECRET_KEY": SECRET_KEY,
            "TICKWISE_MARKET_CALENDAR": "always_open", "TICKWISE_KITE_ROOT": sim_url,
            "TICKWISE_LOG_FORMAT": "json", "TICKWISE_ARGON2_MEMORY_KIB": "8192"}


def http(method: str, url: str, body: object = None, headers: dict | None = None) -> tuple[int, dict]:
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, orjson.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"null")


def test_process_serves_api_and_health_on_one_port_and_exits_0_on_sigterm(redis_url, clean_db, sim_url) -> None:
    with run_api_process(base_env(redis_url, clean_db, sim_url)) as (proc, base, log_path):
        status, ready = http("GET", base + "/readyz")
        assert status == 200 and ready["checks"] == {"redis": "ok", "postgres": "ok"}
        status, user = http("POST", base + "/api/v1/auth/register",
                            {"email": "proc@example.com", "password": "long-enough-pw", "name": "Proc"})
        assert status == 201
        status, token = http("POST", base + "/api/v1/auth/login",
                             {"email": "proc@example.com", "password": "long-enough-pw"})
        status, me = http("GET", base + "/api/v1/me", headers={"Authorization": f"Bearer {token['access_token']}"})
        assert status == 200 and me["id"] == user["id"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        events = [line["event"] for line in lines]
        assert "api started" in events and "api stopped" in events and "request handled" in events
        assert all("request_id" in line for line in lines if line["event"] == "request handled")
        assert "long-enough-pw" not in log_path.read_text() and token["access_token"] not in log_path.read_text()
        assert not any(line.get("level") == "error" for line in lines)


def test_readyz_is_503_while_postgres_does_not_answer(redis_url, sim_url) -> None:
    port = free_port()
    dead_db = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/tickwise"
    env = {**os.environ, **base_env(redis_url, dead_db, sim_url), "TICKWISE_HEALTH_PORT": str(port),
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def not_ready() -> dict | None:
            try:
                status, body = http("GET", f"http://127.0.0.1:{port}/readyz")
            except (urllib.error.URLError, ConnectionError):
                return None
            return body if status == 503 else None

        body = eventually_sync(not_ready, timeout=15)
        assert body["checks"]["redis"] == "ok" and body["checks"]["postgres"].startswith("error")
        assert http("GET", f"http://127.0.0.1:{port}/healthz")[0] == 200
        # A request that needs the database is a 503 in the error shape, not a 500.
        status, error = http("POST", f"http://127.0.0.1:{port}/api/v1/auth/login",
                             {"email": "a@example.com", "password": "whatever"})
        assert status == 503 and error["error"]["code"] == "database_unavailable"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_refuses_to_start_without_a_secret_key(redis_url, database_url) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKWISE_")}
    env.update({"REDIS_URL": redis_url, "DATABASE_URL": database_url, "TICKWISE_HEALTH_PORT": str(free_port()),
                "PYTHONPATH": str(REPO_ROOT)})
    done = subprocess.run([sys.executable, "-m", "services.api"], cwd=REPO_ROOT, env=env, capture_output=True,
                          timeout=30)
    assert done.returncode == 2
    assert b"TICKWISE_SECRET_KEY is required" in done.stderr


def test_sigterm_drains_a_request_in_flight(redis_url, clean_db, sim) -> None:
    with run_api_process(base_env(redis_url, clean_db, sim.base_url)) as (proc, base, _log):
        http("POST", base + "/api/v1/auth/register",
             {"email": "drain@example.com", "password": "long-enough-pw", "name": "Drain"})
        _, token = http("POST", base + "/api/v1/auth/login",
                        {"email": "drain@example.com", "password": "long-enough-pw"})
        account = sim.create_account()
        sim.set_faults(latency_ms=1500, routes=["user"])  # the broker's profile call takes 1.5 s
        try:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(http, "POST", base + "/api/v1/broker/connect",
                                      {k: account[k] for k in ("api_key", "api_secret", "access_token")},
                                      {"Authorization": f"Bearer {token['access_token']}"})
                eventually_sync(lambda: _in_flight(base), timeout=5)
                proc.send_signal(signal.SIGTERM)
                status, body = pending.result(timeout=15)
            assert status == 200 and body["is_valid"] is True
            assert proc.wait(timeout=15) == 0
        finally:
            sim.set_faults()



def _in_flight(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return False
    return 'tickwise_api_requests_in_progress{route="/api/v1/broker/connect"} 1.0' in text
