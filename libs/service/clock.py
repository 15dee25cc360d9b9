"""An injectable clock, so tests and the demo can run a trading day in seconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Return the current time, timezone-aware UTC."""

    def time(self) -> float:
        """Return the current epoch time in seconds."""


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def time(self) -> float:
        return time.time()


class OffsetClock:
    """The wall clock shifted by a fixed offset (settings: TICKWISE_CLOCK_OFFSET_S)."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    def time(self) -> float:
        return time.time() + self.offset_s
