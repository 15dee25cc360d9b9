"""Run a throwaway 3-master Redis Cluster from redis-server, for tests that need one.

API:

    from tests.support.redis_cluster import running_redis_cluster

    with running_redis_cluster(tmp_path, replicas=1) as cluster:   # RedisClusterProcs
        cluster.url                      # "redis://127.0.0.1:PORT/0" of the first node
        cluster.ports                    # every node's port
        cluster.master_ports()           # the ports serving slots now
        cluster.kill_master_of(slot)     # SIGKILL the slot's master; return once a replica serves it

Each node is a `deploy.local.procs.RedisServer` started with
`--cluster-enabled yes` on a free port (and a free cluster-bus port) in its own
directory; `redis-cli
--cluster create ... --cluster-yes` then assigns the 16384 slots in three even
ranges, with `replicas` replicas per master (0 by default). The block is
entered only once every slot is served (`cluster_state:ok` on every node).
Stopping deletes the directories.
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
from tests.support.eventually import eventually_sync

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

    def _client(self) -> redis.Redis:
        for node in self.nodes:
            if node.is_running():
                return redis.Redis(port=node.port, socket_connect_timeout=0.5)
        raise RuntimeError("no cluster node is running")

    def master_ports(self) -> dict[tuple[int, int], int]:
        """Return the port of the master serving each slot range."""
        client = self._client()
        try:
            return {(int(r[0]), int(r[1])): int(r[2][1]) for r in client.cluster("slots")}
        finally:
            client.close()

    def kill_master_of(self, slot: int, timeout: float = 30.0) -> int:
        """SIGKILL the master serving `slot`; return the port of the replica that took over."""
        old = next(port for (lo, hi), port in self.master_ports().items() if lo <= slot <= hi)
        victim = next(node for node in self.nodes if node.port == old)
        _wait_replicated(old, timeout)  # a crash after replication caught up, not a lost-write test
        victim.stop(kill=True)
        survivors = [node.port for node in self.nodes if node.port != old]
        deadline = time.monotonic() + timeout

        def new_master() -> int | None:
            try:
                now = next(port for (lo, hi), port in self.master_ports().items() if lo <= slot <= hi)
            except (redis.RedisError, StopIteration):
                return None
            return now if now != old else None

        now = eventually_sync(new_master, timeout=timeout, interval=0.2,
                              fail=lambda: RuntimeError(f"no replica took slot {slot} over within {timeout}s"))
        _wait_cluster_ok(survivors, timeout=max(1.0, deadline - time.monotonic()))
        return now

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(kill=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_cluster_ok(ports: list[int], timeout: float = 30.0) -> None:
    pending = set(ports)

    def all_ok() -> bool:
        for port in list(pending):
            client = redis.Redis(port=port, socket_connect_timeout=0.5)
            try:
                info = client.cluster("info")
            finally:
                client.close()
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" in text or (isinstance(info, dict) and info.get("cluster_state") == "ok"):
                pending.discard(port)
        return not pending

    eventually_sync(all_ok, timeout=timeout, interval=0.1, fail=lambda: RuntimeError(
        f"redis cluster nodes {sorted(pending)} never reached cluster_state:ok"))


def _wait_replicated(port: int, timeout: float) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        def caught_up() -> bool:
            info = client.info("replication")
            offsets = [info[k]["offset"] for k in info if k.startswith("slave") and isinstance(info[k], dict)]
            return bool(offsets) and all(o >= info["master_repl_offset"] for o in offsets)

        eventually_sync(caught_up, timeout=timeout, interval=0.05,
                        fail=lambda: RuntimeError(f"replicas of {port} did not catch up within {timeout}s"))
    finally:
        client.close()


def _start_node(data_dir: Path) -> RedisServer:
    last_error: Exception | None = None
    for attempt in range(_START_ATTEMPTS):
        # The bus port is explicit: the default (port + 10000) overflows for high free ports.
        node = RedisServer(data_dir / f"try{attempt}", free_port())
        try:
            node.start(appendonly=False, extra=[
                "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", str(node.data_dir / "nodes.conf"), "--cluster-node-timeout", "2000",
            ])
            return node
        except (subprocess.CalledProcessError, RuntimeError) as error:
            last_error = error
            node.stop(kill=True)
    raise RuntimeError(f"cluster node did not start after {_START_ATTEMPTS} attempts") from last_error


def start_redis_cluster(tmpdir: Path | str, masters: int = MASTERS, replicas: int = 0) -> RedisClusterProcs:
    """Start cluster-enabled redis-servers, join them (`replicas` per master); return the running cluster."""
    Path(tmpdir).mkdir(parents=True, exist_ok=True)
    cluster = RedisClusterProcs(Path(tempfile.mkdtemp(prefix="redis-cluster-", dir=tmpdir)))
    try:
        for i in range(masters * (1 + replicas)):
            cluster.nodes.append(_start_node(cluster.root / f"node{i}"))
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )
        _wait_cluster_ok(cluster.ports)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextmanager
def running_redis_cluster(tmpdir: Path | str, masters: int = MASTERS,
                          replicas: int = 0) -> Iterator[RedisClusterProcs]:
    """Run a Redis Cluster for the duration of the block."""
    cluster = start_redis_cluster(tmpdir, masters, replicas)
    try:
        yield cluster
    finally:
        cluster.stop()
