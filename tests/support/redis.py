"""Run a throwaway redis-server for a test module, a session, or a script.

API:

    from tests.support.redis import running_redis, start_redis

    with running_redis(tmp_path) as url:          # "redis://127.0.0.1:PORT/0"
        ...

    url, stop = start_redis(tmp_path, config={"appendonly": "yes"})
    stop()                                        # idempotent

Defaults: `--bind 127.0.0.1 --port FREEPORT --dir <fresh dir under tmpdir>
--save "" --appendonly no`. `config` overrides or adds any redis.conf
directive (`{"appendfsync": "always", "maxmemory": "64mb"}`); an empty
string value is passed as an empty argument, as `--save ""` needs.

Processes are driven by `deploy.local.procs.RedisServer`, the same code the
local stack uses. Stopping the server (SIGTERM) deletes its directory.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from deploy.local.procs import RedisServer, free_port

__all__ = ["running_redis", "start_redis"]

_START_ATTEMPTS = 3


def start_redis(
    tmpdir: Path | str, *, config: Mapping[str, str] | None = None
) -> tuple[str, Callable[[], None]]:
    """Start redis-server; return its URL (db 0) and a stop function."""
    settings = {"appendonly": "no", **(config or {})}
    appendonly = settings.pop("appendonly").lower() == "yes"
    # Later command-line directives override the defaults RedisServer passes.
    extra = [part for name, value in settings.items() for part in (f"--{name}", value)]
    Path(tmpdir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="redis-", dir=tmpdir))
    last_error: Exception | None = None
    for attempt in range(_START_ATTEMPTS):
        # A free port can be taken between probing and binding; try another.
        server = RedisServer(root / f"data{attempt}", free_port())
        try:
            server.start(appendonly=appendonly, extra=extra)
        except (subprocess.CalledProcessError, RuntimeError) as error:
            last_error = error
            server.stop(kill=True)
            continue

        def stop(server: RedisServer = server) -> None:
            server.stop()
            shutil.rmtree(root, ignore_errors=True)

        return server.url, stop
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"redis-server did not start after {_START_ATTEMPTS} attempts") from last_error


@contextmanager
def running_redis(tmpdir: Path | str, *, config: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run redis-server for the duration of the block; yield its URL."""
    url, stop = start_redis(tmpdir, config=config)
    try:
        yield url
    finally:
        stop()
