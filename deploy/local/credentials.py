"""Credentials of the local stack's Redis and Postgres, generated once into `.run/` (0600).

Redis: the `default` user is off, so a client without a password is refused
(`NOAUTH`). Each Tickwise service has its own ACL user and password, allowed
every key but no administrative or dangerous command (FLUSHALL, CONFIG,
KEYS, DEBUG, SHUTDOWN, ...) except `INFO`, which the services read to notice
a Redis restart. The `admin` user (all commands) is for the operator, `make`
and the chaos campaign; its URL is the `REDIS_URL` of `.run/stack.env`.

Postgres: password authentication (scram-sha-256) on loopback, no `trust`.
"""

from __future__ import annotations

import secrets
from pathlib import Path

REDIS_SERVICE_USERS = ("api", "scheduler", "listener", "executor")
"""One ACL user per service that talks to Redis (the simulator does not)."""

_SERVICE_RULES = "~* &* +@all -@admin -@dangerous +info"
_ADMIN_RULES = "~* &* +@all"

_REDIS_USER_OF = {"api": "api", "scheduler": "scheduler", "market_listener": "listener", "executor": "executor"}


def ensure_passwords(state: dict) -> dict[str, str]:
    """Return the stack's passwords, creating any that `state` lacks (it is saved 0600 by the caller)."""
    passwords = state.setdefault("passwords", {})
    for name in ("redis:admin", *(f"redis:{u}" for u in REDIS_SERVICE_USERS), "postgres"):
        passwords.setdefault(name, secrets.token_hex(24))
    return passwords


def redis_acl(passwords: dict[str, str]) -> str:
    """Return the ACL lines of redis.conf."""
    lines = ["user default off", f"user admin on >{passwords['redis:admin']} {_ADMIN_RULES}"]
    lines += [f"user {u} on >{passwords[f'redis:{u}']} {_SERVICE_RULES}" for u in REDIS_SERVICE_USERS]
    return "\n".join(lines) + "\n"


def redis_url(port: int, passwords: dict[str, str], service: str | None = None) -> str:
    """Return the Redis URL of `service` (its own ACL user), or the admin's."""
    user = _REDIS_USER_OF.get(service or "", "admin")
    return f"redis://{user}:{passwords[f'redis:{user}']}@127.0.0.1:{port}/0"


def redis_conf(*, port: int, data_dir: Path, passwords: dict[str, str]) -> str:
    """Return redis.conf: loopback, AOF everysec, no RDB snapshots, ACL users."""
    return (
        f"port {port}\nbind 127.0.0.1\nprotected-mode yes\ndaemonize no\n"
        f'dir "{data_dir}"\nsave ""\nappendonly yes\nappendfsync everysec\n'
        + redis_acl(passwords)
    )
