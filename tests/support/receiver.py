"""Serve a small aiohttp app on a free loopback port (webhook and Bot API stand-ins)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from deploy.local.procs import free_port


@contextlib.asynccontextmanager
async def serve_on_loopback(routes: list[web.RouteDef]) -> AsyncIterator[str]:
    """Run an app with `routes` on 127.0.0.1; yield its base URL; stop it (not waiting on hung handlers)."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
