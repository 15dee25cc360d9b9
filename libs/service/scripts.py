"""Lua scripts, one calling style: a constant beside its caller, run through redis-py's Script.

Each script is a module-level constant beside the one module that calls it, and
its source opens with its contract as Lua comments, every KEYS and ARGV index
it reads listed as `[n]` (keys by their schema name, partition tags left out):

    -- KEYS: [1] runtime:{id} (hash), [2] control:strategies (stream)
    -- ARGV: [1] run_id, [2] control MAXLEN
    -- Returns: 1 if written, 0 if another run is loaded

A Lua fragment shared by several scripts (`take_slot` of the rate limiter) is
`local function`s only, reading no KEYS or ARGV (it takes them as parameters),
and is concatenated after a script's own header.

An object that owns a client registers its scripts once in `__init__`
(`self._move = redis.register_script(_MOVE_DUE)`); a module-level function uses
`script_for(redis, SRC)`, the Script registered for that client, kept while
the client lives. Either is called as `await script(keys=[...], args=[...])`:
EVALSHA, one round trip. When the server lost its script cache (a restart, a
failover to a replica that never loaded it, SCRIPT FLUSH) the Script gets
NOSCRIPT, loads the source (on every primary of a cluster) and runs it again;
callers never see it.

Not in pipelines: a standalone pipeline given `client=pipe` sends SCRIPT EXISTS
before every execute (a round trip more), and a cluster pipeline refuses EVALSHA
outright (RedisClusterException, redis-py 8). Run several scripts concurrently
instead; a cluster routes each by its keys' slot.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from redis.commands.core import AsyncScript

from libs.service.redis_client import AnyRedis

__all__ = ["script_for"]

_registered: WeakKeyDictionary[AnyRedis, dict[str, AsyncScript]] = WeakKeyDictionary()


def script_for(redis: AnyRedis, source: str) -> AsyncScript:
    """Return `source` registered with `redis` (once per client and script)."""
    scripts = _registered.get(redis)
    if scripts is None:
        scripts = _registered[redis] = {}
    script = scripts.get(source)
    if script is None:
        script = scripts[source] = redis.register_script(source)
    return script
