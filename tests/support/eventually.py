"""Poll until a condition holds: the only way tests wait."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(check: Callable[[], Any | Awaitable[Any]], timeout: float = 5.0,
                     interval: float = 0.02, message: str = "") -> Any:
    """Call `check` until it returns a truthy value without raising AssertionError; return that value.

    `check` may be sync or async. On timeout, re-raise the last AssertionError
    or fail with `message`.
    """
    deadline = time.monotonic() + timeout
    last_exc: AssertionError | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            last_exc = None
        except AssertionError as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            if last_exc is not None:
                raise last_exc
            raise AssertionError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def eventually_sync(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02,
                    message: str = "") -> Any:
    """Blocking twin of `eventually` for threaded tests."""
    deadline = time.monotonic() + timeout
    last_exc: AssertionError | None = None
    while True:
        try:
            result = check()
            if result:
                return result
            last_exc = None
        except AssertionError as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            if last_exc is not None:
                raise last_exc
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(interval)
