"""The one back-off formula, the one stop-aware sleep and the one blocking poll the services use."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from libs.service.backoff import Backoff, backoff_delay
from libs.service.lifecycle import Shutdown, poll, sleep_unless_stopped


def test_delay_doubles_from_the_base_up_to_the_cap() -> None:
    assert [backoff_delay(n, base=0.1, cap=1.0) for n in range(1, 7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_a_cap_below_the_base_wins() -> None:
    assert backoff_delay(1, base=60.0, cap=30.0) == 30.0


def test_jitter_stays_in_the_upper_half_of_the_nominal_delay() -> None:
    for attempt in range(1, 12):
        nominal = backoff_delay(attempt, base=1.0, cap=300.0)
        drawn = {backoff_delay(attempt, base=1.0, cap=300.0, jitter=True) for _ in range(50)}
        assert all(nominal / 2 <= d <= nominal for d in drawn)
        assert len(drawn) > 1  # actually random, so simultaneous failures spread out


def test_a_loop_failing_for_days_neither_overflows_nor_passes_the_cap() -> None:
    assert backoff_delay(100_000, base=0.5, cap=5.0) == 5.0
    assert backoff_delay(100_000, base=0.5, cap=5.0, jitter=True) <= 5.0


def test_attempts_count_from_one() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, base=1.0, cap=2.0)


def test_a_retry_loop_backs_off_and_starts_over_after_a_success() -> None:
    backoff = Backoff(base=0.2, cap=1.0)
    assert [backoff.next() for _ in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    backoff.reset()
    assert backoff.next() == pytest.approx(0.2)


async def test_sleep_returns_false_when_the_time_is_up() -> None:
    stop = asyncio.Event()
    assert await sleep_unless_stopped(stop, 0.01) is False


async def test_sleep_ends_early_and_returns_true_when_stopped() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, stop.set)
    # A stop must cut a long pause short: were it not, this test would hit its timeout.
    assert await asyncio.wait_for(sleep_unless_stopped(stop, 3600), 30) is True
    assert await sleep_unless_stopped(stop, 3600) is True  # already stopped: no wait at all


async def test_shutdown_wait_is_the_same_sleep() -> None:
    shutdown = Shutdown()
    assert await shutdown.wait(0.01) is False
    shutdown.request()
    assert await shutdown.wait(3600) is True


def test_poll_returns_the_first_truthy_answer() -> None:
    answers = itertools.chain([None, 0, ""], itertools.repeat(42))
    assert poll(lambda: next(answers), timeout=5, interval=0.001) == 42


def test_poll_gives_up_with_none_after_the_timeout() -> None:
    calls = itertools.count()
    assert poll(lambda: next(calls) < 0, timeout=0.05, interval=0.01) is None
    assert next(calls) >= 2  # it kept asking until the time was up


def test_poll_lets_a_check_say_never() -> None:
    def refused() -> bool:
        raise RuntimeError("password refused")

    with pytest.raises(RuntimeError, match="password refused"):
        poll(refused, timeout=5, interval=0.01)
