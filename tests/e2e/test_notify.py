"""Notifications through real processes: signed webhooks, retried until the receiver recovers, off the trading path."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tests.e2e.harness import Trader
from tests.support.eventually import eventually
from tests.support.receiver import serve_on_loopback


@dataclass
class Receiver:
    """A webhook receiver on loopback: /flaky answers 500 to each event's first two tries, /hang never answers."""

    url: str = ""
    seen: list[tuple[str, int, dict, bytes]] = field(default_factory=list)
    tries: Counter = field(default_factory=Counter)

    async def flaky(self, request: web.Request) -> web.Response:
        body = await request.read()
        event_id = request.headers["X-Tickwise-Event-Id"]
        self.tries[event_id] += 1
        status = 500 if self.tries[event_id] <= 2 else 200
        self.seen.append((event_id, status, dict(request.headers), body))
        return web.Response(status=status)

    async def hang(self, request: web.Request) -> web.Response:
        self.tries["hang:" + request.headers["X-Tickwise-Event-Id"]] += 1
        await asyncio.sleep(3600)
        return web.Response(status=200)

    def delivered(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for event_id, status, _headers, body in self.seen:
            if status == 200:
                out.setdefault(event_id, []).append(json.loads(body))
        return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    async with serve_on_loopback([web.post("/flaky", found.flaky), web.post("/hang", found.hang)]) as base:
        found.url = base
        yield found


@pytest.mark.timeout(90)
async def test_fills_reach_the_webhook_once_per_event_after_it_recovers_and_a_hanging_one_delays_nothing(
        trader: Trader, e2e_stack, http, receiver: Receiver) -> None:
    slow = await Trader(http, e2e_stack).sign_up()
    configured = await trader.call("PUT", "/notifications", {"webhook_url": receiver.url + "/flaky"})
    secret = configured["webhook_secret"]
    assert secret and secret.startswith("whsec_")
    assert (await trader.call("GET", "/notifications"))["webhook_secret"] is None  # shown once
    assert (await slow.call("PUT", "/notifications", {"webhook_url": receiver.url + "/hang"}))["webhook_secret"]
    bad = await trader.call("PUT", "/notifications", {"webhook_url": "ftp://example.com/x"}, expect=422)
    assert bad["error"]["details"][0]["loc"] == ["webhook_url"]

    await trader.tick("BHARTIARTL", 1550)
    sid = await trader.strategy("BHARTIARTL", buy_in_s=2, sell_in_s=300, stop_loss=1500, quantity=6)
    slow_sid = await slow.strategy("BHARTIARTL", buy_in_s=2, sell_in_s=300, stop_loss=1520, quantity=1)
    for who, strategy in ((trader, sid), (slow, slow_sid)):
        await eventually(lambda who=who, strategy=strategy: who.has_position(strategy, "bought"), timeout=20,
                         interval=0.1)
    # Both users' webhooks are being tried; the hanging one holds its attempt open.
    await eventually(lambda: any(k.startswith("hang:") for k in receiver.tries), timeout=15, interval=0.1)
    await trader.tick("BHARTIARTL", 1490)  # under both stops
    for who, strategy in ((trader, sid), (slow, slow_sid)):
        await eventually(lambda who=who, strategy=strategy: who.has_position(strategy, "exited_by_sl"), timeout=20,
                         interval=0.1)

    status = await trader.status(sid)
    delivered = await eventually(lambda: _two_fills(receiver), timeout=40, interval=0.2)
    by_kind = {body["data"]["kind"]: body for bodies in delivered.values() for body in bodies}
    assert all(len(bodies) == 1 for bodies in delivered.values()), "an event id was delivered twice"
    assert all(receiver.tries[event_id] == 3 for event_id in delivered), "each event: two 500s, then delivered"
    assert by_kind["BUY"]["data"]["price"] == status["entry_average_price"]
    assert by_kind["STOPLOSS"]["data"]["price"] == status["exit_average_price"]
    assert by_kind["STOPLOSS"]["data"]["pnl"] == status["realized_pnl"]
    assert {body["strategy_id"] for body in by_kind.values()} == {sid}

    # Signed over timestamp + body with the secret shown once; the timestamp is fresh.
    for event_id, _status, headers, body in receiver.seen:
        stamp = headers["X-Tickwise-Timestamp"]
        assert abs(time.time() - int(stamp)) < 120
        wanted = "v1=" + hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Tickwise-Signature"], wanted), event_id
    # Only this trader's events reach this trader's webhook.
    me = await trader.call("GET", "/me")
    assert {body["user_id"] for bodies in delivered.values() for body in bodies} == {me["id"]}


def _two_fills(receiver: Receiver) -> dict[str, list[dict]] | None:
    delivered = receiver.delivered()
    kinds = sorted(body["data"].get("kind", "") for bodies in delivered.values() for body in bodies
                   if body["type"] == "order_filled")
    return delivered if kinds == ["BUY", "STOPLOSS"] else None
