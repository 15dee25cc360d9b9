"""Capped exponential back-off, the one formula every retry loop uses."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: bool = False) -> float:
    """Return the wait before retry `attempt` (1 = the first): `base * 2**(attempt-1)`, at most `cap`.

    With `jitter` the wait is drawn uniformly from the upper half of that, so
    retries that failed together (one outage, one burst) do not come back
    together, while the wait never drops below half the nominal one.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, not {attempt}")
    # Capping the exponent first keeps 2**n from overflowing a float on a retry loop
    # that has been failing for days.
    ceiling = min(cap, base * 2 ** min(attempt - 1, 64))
    return random.uniform(ceiling / 2, ceiling) if jitter else ceiling


class Backoff:
    """The successive waits of one retry loop: `next()` after each failure, `reset()` after a success."""

    def __init__(self, *, base: float, cap: float, jitter: bool = False) -> None:
        self.base, self.cap, self.jitter = base, cap, jitter
        self.failures = 0

    def next(self) -> float:
        """Count a failure and return how long to wait before trying again."""
        self.failures += 1
        return backoff_delay(self.failures, base=self.base, cap=self.cap, jitter=self.jitter)

    def reset(self) -> None:
        """Start again from `base` (the last attempt succeeded)."""
        self.failures = 0
