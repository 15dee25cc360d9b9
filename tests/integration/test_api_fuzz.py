"""Fuzz a live `python -m services.api` from its own /openapi.json: no input may cause a 5xx.

Schemathesis generates valid and invalid requests for every operation; routes
that need a bearer token get a valid one (a user with a connected paper broker
and a strategy exists, so deeper paths are reached). The budget is spread over
all operations: TICKWISE_FUZZ_EXAMPLES in total (default 300; `make fuzz` raises it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import hypothesis
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis import GenerationMode

from tests.integration.api_support import run_api_process
from tests.integration.test_api_process import base_env

TOTAL_EXAMPLES = int(os.environ.get("TICKWISE_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def live_api(redis_url, database_url, sim_url):
    """A live API process, a user with a paper broker, and one strategy."""
    with run_api_process(base_env(redis_url, database_url, sim_url)) as (proc, base, log_path):
        session = requests.Session()
        email, password = f"fuzz-{os.getpid()}@example.com", "fuzz-password-1"
        session.post(f"{base}/api/v1/auth/register", json={"email": email, "password": password, "name": "Fuzz"})
        token = session.post(f"{base}/api/v1/auth/login", json={"email": email, "password": password}).json()
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        account = session.post(f"{sim_url}/sim/accounts", json={"user_name": "fuzz"}).json()
        reply = session.post(f"{base}/api/v1/broker/connect", headers=headers,
                             json={k: account[k] for k in ("api_key", "api_secret", "access_token")})
        assert reply.status_code == 200, reply.text
        reply = session.post(f"{base}/api/v1/strategies", headers=headers, json={
            "symbol": "INFY", "buy_time": "10:00:00", "sell_time": "11:00:00", "stop_loss": 1.5, "quantity": 1})
        assert reply.status_code == 201, reply.text
        yield base, headers, log_path, session
        assert proc.poll() is None, "the API died during fuzzing"


def fuzz(operation, mode: GenerationMode, examples: int, call: Callable[[Any], None]) -> None:
    """Run `examples` generated cases of one operation in one mode through `call`."""

    @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def exercise(case: Any) -> None:
        call(case)

    try:
        exercise()
    except hypothesis.errors.Unsatisfiable:
        pass  # nothing to negate in an operation without parameters or body


def test_no_generated_request_gets_a_5xx(live_api) -> None:
    base, auth_headers, log_path, session = live_api
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    per_run = max(5, TOTAL_EXAMPLES // (2 * len(operations)))
    failures: list[str] = []
    tried: list[int] = []

    for operation in operations:
        secured = bool(operation.definition.raw.get("security"))

        def call(case: Any, operation: Any = operation, secured: bool = secured) -> None:
            tried.append(1)
            headers = dict(auth_headers) if secured else {}
            response = case.call(base_url=base, session=session, headers=headers, timeout=15)
            if response.status_code >= 500:
                failures.append(f"{operation.method.upper()} {operation.path} -> {response.status_code}: "
                                f"{response.text[:300]} (body={orjson.dumps(case.body, default=repr)[:300]!r})")

        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode, per_run, call)
    print(f"fuzz: {len(tried)} requests, {len(failures)} 5xx")
    assert not failures, "\n".join(failures[:20])
    assert len(tried) >= TOTAL_EXAMPLES // 3, len(tried)
    log_text = log_path.read_text()
    assert "unhandled error" not in log_text, "a request reached the last-resort handler"
