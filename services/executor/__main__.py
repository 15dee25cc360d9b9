"""Run the executor: `python -m services.executor` (settings from the environment)."""

from __future__ import annotations

import asyncio

from libs.service.lifecycle import Shutdown
from libs.service.logging import configure_logging
from services.executor.service import ExecutorService
from services.executor.settings import ExecutorSettings


async def run(settings: ExecutorSettings) -> None:
    shutdown = Shutdown()
    shutdown.install()
    await ExecutorService(settings).run(shutdown.event)


def main() -> None:
    """Read settings once, configure logging, run until SIGTERM, exit 0."""
    settings = ExecutorSettings()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
