"""`make up` / `make down` behaviour: idempotent, writes stack.env, stops what it started."""

from __future__ import annotations

import os
from pathlib import Path

from deploy.local.procs import pid_alive
from deploy.local.stack import LocalStack
from tests.support.postgres import open_to_postgres


def test_up_is_idempotent_and_down_stops_everything(tmp_path: Path) -> None:
    open_to_postgres(tmp_path)
    stack = LocalStack(tmp_path / "run")
    env = stack.up(services=("kite_sim",))
    try:
        written = dict(line.split("=", 1) for line in (stack.run_dir / "stack.env").read_text().splitlines())
        for key in ("REDIS_URL", "DATABASE_URL", "SIM_URL", "TICKWISE_SECRET_KEY"):
            assert written[key] == env[key]
        sim_pid = stack.pid_of("kite_sim")
        assert sim_pid and pid_alive(sim_pid)

        again = stack.up(services=("kite_sim",))
        assert again["REDIS_URL"] == env["REDIS_URL"] and again["DATABASE_URL"] == env["DATABASE_URL"]
        assert again["TICKWISE_SECRET_KEY"] == env["TICKWISE_SECRET_KEY"]
        assert stack.pid_of("kite_sim") == sim_pid, "a second `up` restarted a running process"
        status = stack.status()
        assert (status["redis"], status["postgres"], status["kite_sim"]) == ("up", "up", "up")
    finally:
        stack.down()
    assert not pid_alive(sim_pid)
    status = stack.status()
    assert status["redis"] == status["postgres"] == status["kite_sim"] == "down"
    stack.down()  # a second down is harmless
    assert (stack.run_dir / "pg" / "PG_VERSION").exists(), "down must keep the data"


def test_state_and_env_files_are_private(tmp_path: Path) -> None:
    """Both files hold TICKWISE_SECRET_KEY (the key of every stored broker secret)."""
    stack = LocalStack(tmp_path / "run")
    stack.run_dir.mkdir(parents=True)
    stack.state_file.write_text("{}")
    os.chmod(stack.state_file, 0o644)  # left by an older `make up`
    stack._save({"secret_key": "k"})
    stack._write_env({"TICKWISE_SECRET_KEY": "k"})
    for path in (stack.state_file, stack.run_dir / "stack.env"):
        assert path.stat().st_mode & 0o777 == 0o600, path
