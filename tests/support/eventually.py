"""Poll until a condition holds: the only way tests wait."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class _Wait:
    """One wait's deadline, and the verdict on each attempt."""

    def __init__(self, timeout: float, message: str, fail: Callable[[], BaseException] | None = None) -> None:
        self.deadline = time.monotonic() + timeout
        self.timeout, self.message, self.fail = timeout, message, fail

    def settled(self, result: Any, error: AssertionError | None) -> bool:
        """Return True if the attempt met the condition, False to try again; raise once time is up."""
        if error is None and result:
            return True
        if time.monotonic() < self.deadline:
            return False
        if self.fail is not None:
            raise self.fail() from error
        if error is not None:
            raise error
        raise AssertionError(self.message or f"condition not met within {self.timeout}s")


async def eventually(check: Callable[[], Any | Awaitable[Any]], timeout: float = 5.0,
                     interval: float = 0.02, message: str = "") -> Any:
    """Call `check` until it returns a truthy value without raising AssertionError; return that value.

    `check` may be sync or async. On timeout, re-raise the last AssertionError
    (if the last attempt raised one) or fail with `message`.
    """
    wait = _Wait(timeout, message)
    while True:
        result, error = None, None
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except AssertionError as exc:
            error = exc
        if wait.settled(result, error):
            return result
        await asyncio.sleep(interval)


def eventually_sync(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02,
                    message: str = "", fail: Callable[[], BaseException] | None = None) -> Any:
    """Blocking twin of `eventually` for threaded tests and process start-up.

    `fail`, if given, makes the error raised on timeout (built then, so it can
    quote a log written meanwhile) instead of an AssertionError.
    """
    wait = _Wait(timeout, message, fail)
    while True:
        result, error = None, None
        try:
            result = check()
        except AssertionError as exc:
            error = exc
        if wait.settled(result, error):
            return result
        time.sleep(interval)
