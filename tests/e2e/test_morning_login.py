"""The trader's morning, through real processes: expired token, pre-open flag, Kite login, BUY on time.

The scheduler replica added here runs its pre-open token check a few seconds
from now (TICKWISE_PREOPEN_CHECK_TIME); the login goes through the paper
broker's login page and back to the API's callback with a plain HTTP client.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import aiohttp

from tests.e2e.harness import Stack, Trader, ist_clock
from tests.support.eventually import eventually
from tests.support.kite_login import press_login

SESSION_EXPIRED = "Kite session expired: log in again"


async def kite_trader(http: aiohttp.ClientSession, stack: Stack) -> Trader:
    """A signed-up trader whose paper Kite app redirects to the API's login callback."""
    trader = Trader(http, stack)
    email = f"morning-{uuid4().hex[:10]}@example.com"
    await trader.call("POST", "/auth/register", {"email": email, "password": "pass-word-123", "name": "M"},
                      expect=201)
    trader.token = (await trader.call("POST", "/auth/login", {"email": email, "password": "pass-word-123"}))[
        "access_token"]
    trader.account = await trader.sim("POST", "accounts", {
        "user_name": email, "redirect_url": f"{stack.api_url}/api/v1/broker/callback"})
    await trader.call("POST", "/broker/connect", {k: trader.account[k] for k in ("api_key", "api_secret",
                                                                                  "access_token")})
    return trader


async def _status_where(trader: Trader, sid: str, **wanted: Any) -> dict[str, Any] | None:
    status = await trader.status(sid)
    return status if all(status.get(k) == v for k, v in wanted.items()) else None


async def test_morning_login_clears_the_flag_and_the_buy_goes_out(e2e_stack: Stack,
                                                                  http: aiohttp.ClientSession) -> None:
    # The pre-open check of this replica runs 12 s from now; every other replica's is at 08:45 IST.
    e2e_stack.add_replica("scheduler", {"TICKWISE_PREOPEN_CHECK_TIME": ist_clock(12)})
    trader = await kite_trader(http, e2e_stack)
    await trader.tick("INFY", 1500)
    sid = await trader.strategy("INFY", buy_in_s=30, sell_in_s=36, stop_loss=1400, quantity=3)
    await trader.sim("POST", f"accounts/{trader.account['api_key']}/expire")  # 06:00 came and went

    flagged = await eventually(lambda: _status_where(trader, sid, needs_login=True), timeout=30, interval=0.2,
                               message="the pre-open check never flagged the strategy")
    assert flagged["status"] == "running" and SESSION_EXPIRED in flagged["reason"]
    assert flagged["next_buy_at"] and flagged["trading_day"]
    broker = await trader.call("GET", "/broker")
    assert broker["token_state"] == "expired" and broker["is_valid"] is False

    login = await trader.call("GET", "/broker/login")
    callback = await press_login(http, login["login_url"])
    assert callback.startswith(f"{e2e_stack.api_url}/api/v1/broker/callback?")
    async with http.get(callback) as page:  # follow the redirects like a browser
        assert page.status == 200 and "text/html" in page.content_type
        assert parse_qs(urlsplit(str(page.url)).query) == {"broker_login": ["success"]}

    cleared = await trader.status(sid)  # at once, nothing restarted
    assert cleared["needs_login"] is False and cleared["reason"] is None and cleared["status"] == "running"
    assert (await trader.call("GET", "/broker"))["token_state"] == "valid"

    await eventually(lambda: _status_where(trader, sid, status="exited"), timeout=90, interval=0.2)
    orders = await trader.broker_orders()
    assert [(o["transaction_type"], o["status"]) for o in orders] == [("BUY", "COMPLETE"), ("SELL", "COMPLETE")]


async def test_a_trader_who_never_logs_in_gets_one_abort_and_no_order(trader: Trader) -> None:
    await trader.tick("TCS", 3500)  # the session's simulator keeps other tests' prices: set this test's market
    sid = await trader.strategy("TCS", buy_in_s=3, sell_in_s=30, stop_loss=3000)
    await trader.sim("POST", f"accounts/{trader.account['api_key']}/expire")
    failed = await eventually(lambda: _status_where(trader, sid, status="failed"), timeout=25, interval=0.2)
    assert failed["reason"].startswith(SESSION_EXPIRED)
    logs = await eventually(lambda: _aborts(trader, sid), timeout=10)
    assert len(logs) == 1 and logs[0]["response_payload"]["aborted"].startswith(SESSION_EXPIRED)
    assert await trader.broker_orders() == []
    assert (await trader.strategy_row(sid))["failure_reason"].startswith(SESSION_EXPIRED)
    broker = await trader.call("GET", "/broker")  # true to the broker's last answer (at the BUY)
    assert broker["token_state"] == "expired" and broker["is_valid"] is False


async def _aborts(trader: Trader, sid: str) -> list[dict[str, Any]]:
    return [row for row in await trader.logs(sid) if row["event_type"] == "ABORT"]
