"""Run the API: `python -m services.api` (API, health and metrics on one port)."""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from libs.service.lifecycle import Shutdown
from libs.service.logging import configure_logging, get_logger
from services.api.app import build_app
from services.api.edge import JsonErrorRunner
from services.api.security import MissingSecretKey
from services.api.settings import ApiSettings


async def serve(settings: ApiSettings) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight requests within the grace period."""
    log = get_logger("api")
    app = build_app(settings)
    shutdown = Shutdown()
    shutdown.install()
    runner = JsonErrorRunner(app, access_log=None, shutdown_timeout=settings.shutdown_grace_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.health_host, settings.port)
    await site.start()
    log.info("api started", host=settings.health_host, port=settings.port, calendar=settings.market_calendar,
             kite_root=settings.kite_root or "https://api.kite.trade")
    await shutdown.wait()
    log.info("api stopping", signal=shutdown.signal_name)
    await runner.cleanup()
    log.info("api stopped")


def main() -> int:
    settings = ApiSettings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except MissingSecretKey as exc:
        get_logger("api").error("refusing to start", reason=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
