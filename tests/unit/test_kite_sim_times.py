"""The simulator's cached Kite time formatting matches datetime's, second boundaries included."""

from __future__ import annotations

import random
from datetime import datetime

from services.kite_sim.orders import IST, kite_time


def reference(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, IST).strftime("%Y-%m-%d %H:%M:%S")


def test_kite_time_matches_datetime_at_and_around_second_boundaries() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        whole = rng.randrange(1_600_000_000, 1_800_000_000)
        for epoch in (whole + rng.random(), float(whole), whole - 1e-7, whole - 4e-7, whole - 6e-7, whole + 5e-7):
            assert kite_time(epoch) == reference(epoch), epoch


def test_kite_time_formats_ist() -> None:
    assert kite_time(1_700_000_000.5) == "2023-11-15 03:43:20"
