"""Signal-driven shutdown: a handler only sets an event; owners drain and exit."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


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
        return await sleep_unless_stopped(self.event, timeout)


def poll(check: Callable[[], T], *, timeout: float, interval: float) -> T | None:
    """Call `check` every `interval` s until it returns a truthy value, which is returned; None after `timeout`.

    For blocking start-up waits (a server accepting connections). `check` returns
    something falsy for "not yet" and raises for "never".
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float | None) -> bool:
    """Sleep `seconds` (None: for ever) or until `stop` is set; return True if it was set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


def _leaf(exc: BaseException) -> BaseException:
    """Return the first leaf of an exception group (TaskGroup failures), or the exception."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def supervise(work: Coroutine[Any, Any, Any], stop: Callable[[], None], shutdown: Shutdown, *,
                    name: str, grace_s: float, log: Any,
                    exits: Mapping[type[BaseException], tuple[int, str]] | None = None) -> int:
    """Run `work` until it ends or shutdown is asked; drain it within `grace_s`; return the exit code.

    0 after a clean stop (or a drain cut short by the grace period), the code in
    `exits` for a known fatal error (logged critical with its message), else 1.
    """
    runner = asyncio.create_task(work, name=name)
    stop_wait = asyncio.create_task(shutdown.event.wait(), name="shutdown")
    try:
        await asyncio.wait({runner, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop()
        try:
            await asyncio.wait_for(runner, grace_s)
        except TimeoutError:
            log.error(f"{name} did not stop in time; cancelled")
        except Exception as exc:  # a crashed loop must end the process non-zero
            leaf = _leaf(exc)
            for kind, (code, message) in (exits or {}).items():
                if isinstance(leaf, kind):
                    log.critical(message, reason=str(leaf))
                    return code
            log.exception(f"{name} crashed")
            return 1
        return 0
    finally:
        stop_wait.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stop_wait
