"""Run a throwaway 3-master Redis Cluster from redis-server, for tests that need one.

API:

    from tests.support.redis_cluster import running_redis_cluster

    with running_redis_cluster(tmp_path) as cluster:   # RedisClusterProcs
        cluster.url                                     # "redis://127.0.0.1:PORT/0" of the first node
        cluster.ports                                   # every node's port

Each node is a `deploy.local.procs.RedisServer` started with
`--cluster-enabled yes` on a free port (and a free cluster-bus port) in its own
directory; `redis-cli
--cluster create ... --cluster-yes` then assigns the 16384 slots in three even
ranges. The block is entered only once every slot is served (`cluster_state:ok`
on every node). Nodes have no replicas: the tests exercise slot routing, not
failover. Stopping deletes the directories.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from deploy.local.procs import RedisServer, free_port

__all__ = ["RedisClusterProcs", "running_redis_cluster"]

MASTERS = 3
_START_ATTEMPTS = 3


@dataclass
class RedisClusterProcs:
    """The nodes of one local cluster."""

    root: Path
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(kill=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_cluster_ok(ports: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ports)
    while pending and time.monotonic() < deadline:
        for port in list(pending):
            info = redis.Redis(port=port, socket_connect_timeout=0.5).cluster("info")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" in text or (isinstance(info, dict) and info.get("cluster_state") == "ok"):
                pending.discard(port)
        time.sleep(0.1)
    if pending:
        raise RuntimeError(f"redis cluster nodes {sorted(pending)} never reached cluster_state:ok")


def _start_node(data_dir: Path) -> RedisServer:
    last_error: Exception | None = None
    for attempt in range(_START_ATTEMPTS):
        # The bus port is explicit: the default (port + 10000) overflows for high free ports.
        node = RedisServer(data_dir / f"try{attempt}", free_port())
        try:
            node.start(appendonly=False, extra=[
                "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", str(node.data_dir / "nodes.conf"), "--cluster-node-timeout", "5000",
            ])
            return node
        except (subprocess.CalledProcessError, RuntimeError) as error:
            last_error = error
            node.stop(kill=True)
    raise RuntimeError(f"cluster node did not start after {_START_ATTEMPTS} attempts") from last_error


def start_redis_cluster(tmpdir: Path | str, masters: int = MASTERS) -> RedisClusterProcs:
    """Start `masters` cluster-enabled redis-servers and join them; return the running cluster."""
    Path(tmpdir).mkdir(parents=True, exist_ok=True)
    cluster = RedisClusterProcs(Path(tempfile.mkdtemp(prefix="redis-cluster-", dir=tmpdir)))
    try:
        for i in range(masters):
            cluster.nodes.append(_start_node(cluster.root / f"node{i}"))
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )
        _wait_cluster_ok(cluster.ports)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextmanager
def running_redis_cluster(tmpdir: Path | str, masters: int = MASTERS) -> Iterator[RedisClusterProcs]:
    """Run a Redis Cluster for the duration of the block."""
    cluster = start_redis_cluster(tmpdir, masters)
    try:
        yield cluster
    finally:
        cluster.stop()
