"""Signal-driven shutdown: a handler only sets an event; owners drain and exit."""

from __future__ import annotations

import asyncio
import signal


class Shutdown:
    """Own the process's stop event and install SIGTERM/SIGINT handlers for it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal_name: str | None = None

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signal_name = sig.name
        self.event.set()

    def request(self) -> None:
        """Ask for shutdown from inside the process."""
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for shutdown up to `timeout`; return True if it was requested."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        return True
