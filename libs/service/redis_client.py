"""The one place a service opens Redis: a standalone client or a cluster client, from settings.

`connect_redis(settings)` returns `redis.asyncio.Redis` for a standalone server
(or a Sentinel-managed primary behind one address) and `redis.asyncio.RedisCluster`
when `settings.redis_cluster` is set; both speak the same commands, scripts and
pipelines the services use (in a cluster every script and MULTI touches one hash
slot: libs.schema.keys tags the keys so). It also applies `redis_partitions`
to libs.schema.keys, so that the key names and the client a process uses
always come from the same settings.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster

from libs.schema import keys
from libs.service.settings import ServiceSettings

__all__ = ["AnyRedis", "as_text", "connect_redis"]

AnyRedis = Redis | RedisCluster


def connect_redis(settings: ServiceSettings, *, max_connections: int | None = None, blocking_timeout_s: float | None = None,
                  **options: Any) -> AnyRedis:
    """Return a client for `settings.redis_url` (not yet connected) and set the key partitioning.

    `max_connections` bounds the pool (per node in a cluster); with `blocking_timeout_s`
    a standalone client waits that long for a free connection instead of failing.
    Other options (socket timeouts, health_check_interval) pass through.
    """
    keys.configure_partitions(settings.redis_partitions)
    if settings.redis_cluster:
        if max_connections is not None:
            options["max_connections"] = max_connections
        return RedisCluster.from_url(settings.redis_url, **options)
    if blocking_timeout_s is not None:
        pool = BlockingConnectionPool.from_url(settings.redis_url, max_connections=max_connections or 50,
                                               timeout=blocking_timeout_s, **options)
        return Redis(connection_pool=pool)
    if max_connections is not None:
        options["max_connections"] = max_connections
    return Redis.from_url(settings.redis_url, **options)


def as_text(value: bytes | str) -> str:
    """Return a Redis reply value as text (clients without decode_responses answer bytes)."""
    return value.decode() if isinstance(value, bytes) else value


async def server_run_id(redis: AnyRedis) -> str:
    """Return the run_id of the server, or of every primary of a cluster joined in node order.

    A change means a server restarted or a replica was promoted: writes may be lost.
    """
    if isinstance(redis, RedisCluster):
        infos = await redis.info("server", target_nodes=RedisCluster.PRIMARIES)
        return ",".join(f"{node}={info.get('run_id')}" for node, info in sorted(infos.items()))
    return str((await redis.info("server")).get("run_id"))
