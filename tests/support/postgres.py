"""Run a throwaway Postgres for a test module, a session, or a script.

API:

    from tests.support.postgres import running_postgres, start_postgres

    with running_postgres(tmp_path) as url:       # context manager
        ...  # url == "postgresql+psycopg://postgres@127.0.0.1:PORT/tickwise"

    url, stop = start_postgres(tmp_path)          # or start/stop by hand
    stop()                                        # idempotent

The server listens on 127.0.0.1 on a free port, trusts every local
connection (no password), runs with fsync off, and has an empty database
(`tickwise` unless `database=` says otherwise): run
`libs.schema.migrate.upgrade_head(url)` to create the tables. Stopping it
deletes its data.

Processes are driven by `deploy.local.procs.PostgresServer`, the same code the
local stack uses. Postgres refuses to run as root, so under root it runs as
the `postgres` system user; that user must be able to reach the data dir, so
when `tmpdir` sits under a private directory (pytest's are 0700) a fresh
directory under the system temp dir is used instead.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy.local.procs import PostgresServer, free_port

__all__ = ["open_to_postgres", "running_postgres", "start_postgres"]

_START_ATTEMPTS = 3


def open_to_postgres(path: Path) -> None:
    """Let the `postgres` user (Postgres runs as it when tests run as root) reach `path`.

    pytest's temp dirs are 0700; open `path` and its ancestors below /tmp.
    """
    for directory in [path, *path.parents]:
        if str(directory) in ("/", "/tmp"):
            break
        os.chmod(directory, 0o755)


def _reachable_by_others(path: Path) -> bool:
    # The postgres user needs search (x) permission on every ancestor.
    for directory in [path, *path.parents]:
        if not directory.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _server_root(tmpdir: Path) -> Path:
    """Make and return a fresh directory to hold the cluster."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and not _reachable_by_others(tmpdir):
        root = Path(tempfile.mkdtemp(prefix="tickwise-pg-"))
    else:
        root = Path(tempfile.mkdtemp(prefix="pg-", dir=tmpdir))
    # mkdtemp makes it 0700; the postgres user must reach its data dir inside.
    os.chmod(root, 0o755)
    return root


def start_postgres(tmpdir: Path | str, *, database: str = "tickwise") -> tuple[str, Callable[[], None]]:
    """Start Postgres with an empty `database`; return its SQLAlchemy URL and a stop function."""
    root = _server_root(Path(tmpdir))
    last_error: Exception | None = None
    for attempt in range(_START_ATTEMPTS):
        # A free port can be taken between probing and binding; try another.
        server = PostgresServer(root / f"data{attempt}", free_port(), database=database)
        try:
            server.start(fsync=False)
        except subprocess.CalledProcessError as error:
            last_error = error
            server.stop(mode="immediate")
            continue

        def stop(server: PostgresServer = server) -> None:
            server.stop(mode="fast")
            shutil.rmtree(root, ignore_errors=True)

        return server.url, stop
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"Postgres did not start after {_START_ATTEMPTS} attempts; logs were in {root}") from last_error


@contextmanager
def running_postgres(tmpdir: Path | str, *, database: str = "tickwise") -> Iterator[str]:
    """Run Postgres for the duration of the block; yield its SQLAlchemy URL."""
    url, stop = start_postgres(tmpdir, database=database)
    try:
        yield url
    finally:
        stop()
