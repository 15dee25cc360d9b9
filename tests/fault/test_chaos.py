"""A short seeded chaos campaign (about two minutes, every fault kind at least once).

`make chaos` runs a longer one; see `tests/fault/chaos.py` for what the nemesis
does and what the checker counts.
"""

from __future__ import annotations

import pytest

from tests.fault.chaos import BROKER_FAULTS, Plan, run_campaign


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_short_campaign_places_every_order_exactly_once_under_every_fault() -> None:
    plan = Plan(seed=7, minutes=2, users=6, strategies=24, kills=8, redis_crashes=1, pg_outages=1,
                pg_outage_s=10, broker_faults=len(BROKER_FAULTS))
    report = await run_campaign(plan)
    print(report.json_line())
    for kind in ("executor", "scheduler", "market_listener", "redis", "postgres", *BROKER_FAULTS):
        assert report.kills.get(kind, 0) >= 1, f"the nemesis never did {kind}: {report.kills}"
    assert report.broker_orders >= plan.strategies, "too little traded for the count to mean anything"
    assert report.ok, report.json_line()
