"""No service writes a secret of its settings into its log, from start to stop.

Each service runs as a real subprocess with every secret setting given a
recognisable value (a real one where the service uses it: the simulator's
market-data token, a real secret box key), is stopped with SIGTERM, and its
whole log is searched for those values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from libs.service.secretbox import generate_key
from tests.integration.pipeline_support import listener_env, run_service
from tests.support.kite_sim import SimAdmin

pytestmark = pytest.mark.timeout(90)

SENTINEL = "s3ntinel-Do-Not-Log"


def _with_db_password(database_url: str) -> str:
    # The test server trusts local connections, so a password in the URL is carried but never checked.
    return database_url.replace("postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{SENTINEL}-db@", 1)


@pytest.mark.parametrize("module", ["services.api", "services.executor", "services.scheduler",
                                    "services.market_listener"])
def test_a_service_logs_none_of_its_secrets(module: str, redis_url: str, clean_db: str, sim: SimAdmin,
                                            paper_account: dict[str, Any], tmp_path: Path) -> None:
    secret_key = generate_key()
    env = {"REDIS_URL": redis_url, "DATABASE_URL": _with_db_password(clean_db), "TICKWISE_KITE_ROOT": sim.base_url,
           "TICKWISE_SECRET_KEY": secret_key, "TICKWISE_SECRET_KEYS_RETIRED": generate_key(),
           "TICKWISE_JWT_SECRET": f"{SENTINEL}-jwt-0123456789abcdef0123456789",
           "TICKWISE_TELEGRAM_BOT_TOKEN": f"{SENTINEL}-telegram", "TICKWISE_LOG_LEVEL": "DEBUG",
           "TICKWISE_ARGON2_MEMORY_KIB": "8192",
           **listener_env(redis_url, sim.base_url, paper_account)}
    assert SENTINEL in env["DATABASE_URL"]
    secrets = [secret_key, env["TICKWISE_SECRET_KEYS_RETIRED"], SENTINEL, paper_account["access_token"],
               paper_account["api_key"]]
    with run_service(module, env, tmp_path) as service:
        pass
    assert service.proc.returncode == 0, service.log_text()[-2000:]
    log = service.log_text()
    # The lines worth searching are there: the start-up line (which carries settings) and the last one.
    assert any(word in log for word in (" started", " consuming")) and " stopped" in log, log[-2000:]
    leaked = [s[:6] + "..." for s in secrets if s in log]
    assert not leaked, f"{module} logged secrets starting {leaked}"
