"""After Redis restarts, the API's next requests succeed: its pooled connections are replaced, not failed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from deploy.local.procs import RedisServer, free_port
from tests.integration.api_support import PASSWORD, ApiHarness

pytest_plugins = ["tests.integration.api_support"]

REQUESTS = 12  # more than the connections the warm-up leaves in the pool


async def test_requests_after_a_redis_restart_do_not_fail_on_dead_pooled_connections(
        api_factory: Callable[..., Awaitable[ApiHarness]], tmp_path: Path) -> None:
    port = free_port()
    server = RedisServer(tmp_path / "before", port)
    server.start(appendonly=False)
    try:
        api = await api_factory(redis_url=server.url)
        # Concurrent requests leave several connections in the API's pool.
        users = await asyncio.gather(*(api.user(f"U{i}") for i in range(4)))
        server.stop()
        server = RedisServer(tmp_path / "after", port)  # same address, fresh server: every pooled socket is dead
        server.start(appendonly=False)
        for i in range(REQUESTS):
            user = users[i % len(users)]
            reply = await api.v1("POST", "/auth/login", {"email": user.email, "password": PASSWORD})
            assert reply.status == 200, reply.text  # not a 503 from a dead pooled connection
        await api.user("After")
    finally:
        server.stop()
