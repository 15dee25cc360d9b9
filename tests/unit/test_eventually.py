"""The polling helper every test waits with."""

from __future__ import annotations

import itertools

import pytest

from tests.support.eventually import eventually, eventually_sync


async def test_returns_the_first_truthy_value_of_a_sync_or_async_check() -> None:
    calls = itertools.count(1)
    assert await eventually(lambda: next(calls) >= 3 and "done") == "done"

    async def later() -> int:
        return 7

    assert await eventually(later) == 7


async def test_the_last_assertion_error_explains_a_timeout() -> None:
    def check() -> None:
        raise AssertionError("position is none")

    with pytest.raises(AssertionError, match="position is none"):
        await eventually(check, timeout=0.05)


async def test_a_falsy_check_times_out_with_the_message() -> None:
    with pytest.raises(AssertionError, match="never bought"):
        await eventually(lambda: False, timeout=0.05, message="never bought")


def test_the_blocking_twin_behaves_the_same() -> None:
    calls = itertools.count(1)
    assert eventually_sync(lambda: next(calls) >= 3) is True
    with pytest.raises(AssertionError, match="condition not met within 0.05s"):
        eventually_sync(lambda: 0, timeout=0.05)


def test_a_timeout_can_raise_an_error_built_when_it_happens() -> None:
    log = ["starting"]

    def ready() -> bool:
        log.append("still starting")
        return False

    with pytest.raises(RuntimeError, match="still starting"):
        eventually_sync(ready, timeout=0.05, fail=lambda: RuntimeError(f"not ready: {log[-1]}"))


def test_other_errors_are_not_retried() -> None:
    with pytest.raises(KeyError):
        eventually_sync(lambda: {}["missing"], timeout=5)
