"""Fixtures for the simulator's REST tests: a clean simulator, an account and its official client.

Use them with `pytest_plugins = ["tests.integration.kite_sim_support"]` in a test module that
defines a `sim_url` fixture (its own simulator, with the settings it needs).
"""

from __future__ import annotations

from typing import Any

import pytest
from kiteconnect import KiteConnect

from tests.support.kite_sim import SimAdmin


@pytest.fixture
def admin(sim_url: str) -> SimAdmin:
    """The simulator's admin API, after a reset (no accounts, no faults, base prices)."""
    admin = SimAdmin(sim_url)
    admin.reset()
    return admin


@pytest.fixture
def account(admin: SimAdmin) -> dict[str, Any]:
    """A fresh paper account."""
    return admin.create_account("Asha Rao")


@pytest.fixture
def kite(sim_url: str, account: dict[str, Any]) -> KiteConnect:
    """The official client, logged in to `account`, pointed at the simulator."""
    return KiteConnect(account["api_key"], access_token=account["access_token"], root=sim_url, timeout=5)
