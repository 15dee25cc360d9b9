"""Issue 13 item 1: a rejected connect never replaces working credentials, and a held position stays reachable.

The API in-process, a real executor (in-process) and a stand-in scheduler, against the Kite simulator.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, time, timedelta

import pytest

from libs.schema import keys
from libs.schema.models import AbortEvent, EventType, StrategyConfig, event_to_json, parse_event
from libs.trading.calendar import IST
from libs.trading.tags import order_tag
from services.api.broker import mark_invalid
from services.executor.service import ExecutorService
from tests.integration.api_support import SECRET_KEY, ApiHarness
from tests.integration.executor_support import executor_settings, fake_scheduler, running_executor
from tests.support.eventually import eventually

pytest_plugins = ["tests.integration.api_support"]
pytestmark = pytest.mark.timeout(90)

SECRETS = ("api_key", "api_secret", "access_token")


@pytest.fixture
async def pipeline(api: ApiHarness, redis, redis_url: str, clean_db: str) -> AsyncIterator[ExecutorService]:
    settings = executor_settings(redis_url, clean_db, api.sim.base_url, event_early_tolerance_s=2.0,
                                 secret_key=SECRET_KEY)
    async with running_executor(settings) as service, fake_scheduler(redis):
        yield service


async def _status(api: ApiHarness, user, sid: str) -> dict:
    return (await api.v1("GET", f"/strategies/{sid}/status", user=user, expect=200)).body


async def test_rejected_connect_keeps_working_credentials(api: ApiHarness, redis) -> None:
    user = await api.connected_user("Typo")
    stored = await redis.hget(keys.broker_credentials_key(user.id), "access_token")
    typo = {k: user.broker[k] for k in SECRETS} | {"access_token": user.broker["access_token"] + "x"}
    reply = await api.v1("POST", "/broker/connect", typo, user=user, expect=422)
    assert reply.body["error"]["code"] == "broker_credentials_invalid"
    assert reply.body["error"]["details"]["stored_unchanged"] is True
    assert (await api.v1("GET", "/broker", user=user, expect=200)).body["is_valid"] is True
    assert await redis.hget(keys.broker_credentials_key(user.id), "access_token") == stored
    # The stored token still trades: a strategy can be created (it asks the broker).
    await api.strategy(user, buy_time="10:00:00", sell_time="11:00:00")


async def _failed_run_left_holding(api: ApiHarness, redis, user, quantity: int = 1) -> tuple[dict, str, str]:
    """Start a run, let it buy, then fail it the way a refused token at sell time does: position left open.

    Return the strategy and its run's entry and exit tags.
    """
    now = datetime.now(IST)
    if now.time() > time(23, 58):
        pytest.skip("the run's BUY and SELL must fall on one IST day")
    in_2s, later = now + timedelta(seconds=2), min(now + timedelta(seconds=600), now.replace(hour=23, minute=59, second=59))
    strategy = await api.strategy(user, buy_time=in_2s.strftime("%H:%M:%S"), sell_time=later.strftime("%H:%M:%S"),
                                  quantity=quantity)
    sid = strategy["id"]
    await api.v1("POST", "/strategies/start", {"strategy_id": sid}, user=user, expect=200)

    async def bought() -> bool:
        return (await _status(api, user, sid))["position"] == "bought"

    await eventually(bought, timeout=20, interval=0.2)
    config = StrategyConfig.model_validate_json(await redis.get(keys.strategy_key(sid)))
    buy = next(e for _i, f in await redis.xrange(keys.ORDERS_STREAM) if (e := parse_event(f[b"event"])).event_type
               == EventType.BUY)
    abort = AbortEvent(strategy_id=buy.strategy_id, run_id=buy.run_id, trading_day=buy.trading_day,
                       reason="test: the exit's token was refused")
    # The run fails the way a refused token fails it at sell time: ABORTed, the position left open.
    await redis.xadd(keys.ORDERS_STREAM, {"event": event_to_json(abort)})

    async def failed() -> bool:
        row = (await api.v1("GET", f"/strategies/{sid}", user=user, expect=200)).body
        return row["status"] == "failed" and not await redis.exists(keys.strategy_key(sid))

    await eventually(failed, timeout=20, interval=0.2)
    exit_tag = order_tag(uuid.UUID(sid), config.run_id, abort.trading_day, "exit")
    entry_tag = order_tag(uuid.UUID(sid), config.run_id, abort.trading_day, "entry")
    assert not api.sim.orders(tag=exit_tag)
    return strategy, entry_tag, exit_tag


async def test_square_off_of_a_failed_run_exits_the_open_position_exactly_once(api: ApiHarness, redis,
                                                                               pipeline) -> None:
    user = await api.connected_user("Held")
    strategy, entry_tag, exit_tag = await _failed_run_left_holding(api, redis, user)
    sid = strategy["id"]
    assert [o["status"] for o in api.sim.orders(tag=entry_tag)] == ["COMPLETE"]

    # Without working credentials: an error saying what to do, never a 200 having done nothing.
    await mark_invalid(api.app, uuid.UUID(user.id))
    refused = await api.v1("POST", "/strategies/stop", {"strategy_id": sid, "square_off": True}, user=user)
    assert refused.status == 409 and refused.body["error"]["code"] == "broker_credentials_invalid"
    assert "/api/v1/broker/session" in refused.body["error"]["message"]
    await api.v1("POST", "/broker/connect", {k: user.broker[k] for k in SECRETS}, user=user, expect=200)

    first, second = [await api.v1("POST", "/strategies/stop", {"strategy_id": sid, "square_off": True}, user=user,
                                  expect=200) for _ in range(2)]
    assert first.body["changed"] is True and "square-off queued" in first.body["reason"]
    assert second.body["changed"] is False

    async def exited() -> list:
        orders = api.sim.orders(tag=exit_tag)
        assert [o["status"] for o in orders] == ["COMPLETE"] and not await redis.exists(keys.strategy_key(sid))
        return orders

    sell = (await eventually(exited, timeout=20, interval=0.2))[0]
    assert sell["transaction_type"] == "SELL" and sell["quantity"] == strategy["quantity"]
    after = await api.v1("POST", "/strategies/stop", {"strategy_id": sid, "square_off": True}, user=user, expect=200)
    assert after.body["changed"] is False and "already filled" in after.body["reason"]
    assert after.body["status"] == "failed"
    assert len(api.sim.orders(api_key=user.broker["api_key"])) == 2  # one BUY, one SELL: never a second exit


async def test_square_off_of_a_failed_run_sells_what_a_cancelled_entry_filled(api: ApiHarness, redis,
                                                                               pipeline) -> None:
    # A thin book: the exchange fills 5 of 8 and cancels the rest. The 5 shares are held all the same.
    api.sim.set_liquidity(depth_quantity=1, cancel_unfilled_market=True)
    user = await api.connected_user("PartHeld")
    strategy, entry_tag, exit_tag = await _failed_run_left_holding(api, redis, user, quantity=8)
    entry = api.sim.orders(tag=entry_tag)
    assert [(o["status"], o["filled_quantity"]) for o in entry] == [("CANCELLED", 5)]
    api.sim.set_liquidity(depth_quantity=100, cancel_unfilled_market=False)

    stop = await api.v1("POST", "/strategies/stop", {"strategy_id": strategy["id"], "square_off": True},
                        user=user, expect=200)
    assert stop.body["changed"] is True and "square-off queued" in stop.body["reason"]

    async def sold() -> list:
        orders = api.sim.orders(tag=exit_tag)
        assert [o["status"] for o in orders] == ["COMPLETE"]
        return orders

    sell = (await eventually(sold, timeout=20, interval=0.2))[0]
    assert (sell["transaction_type"], sell["quantity"]) == ("SELL", 5)  # what filled, never the 8 asked
