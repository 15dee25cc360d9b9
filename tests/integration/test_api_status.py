"""Status (data model §4.7) from Redis while loaded, from Postgres afterwards; the order log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.types.json import Jsonb

from libs.schema import keys
from tests.integration.api_support import clock

pytest_plugins = ["tests.integration.api_support"]


def add_log(database_url: str, strategy_id: str, user_id: str, event_type: str, status: str,
            created_at: datetime, order_id: str | None = None) -> str:
    row_id = str(uuid.uuid4())
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO order_logs (id, strategy_id, user_id, event_type, request_payload, response_payload, "
            "status, created_at, trading_day, broker_order_id, tag) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (row_id, strategy_id, user_id, event_type, Jsonb({"qty": 1}), Jsonb({"status": "COMPLETE"}), status,
             created_at, created_at.date(), order_id, "TWE" + "A" * 17),
        )
    return row_id


async def running(api):
    user = await api.connected_user()
    strategy = await api.strategy(user, buy_time=clock(600), sell_time=clock(1200))
    await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user, expect=200)
    return user, strategy


async def test_status_of_a_loaded_run_reads_runtime_and_the_listener_price(api, redis) -> None:
    user, strategy = await running(api)
    sid = strategy["id"]
    moment = "2026-01-05T04:00:00.123456Z"
    await redis.hset(keys.runtime_key(sid), mapping={"position": "bought", "last_action": "BUY",
                                                     "last_price": "1500.5", "updated_at": moment})
    reply = await api.v1("GET", f"/strategies/{sid}/status", user=user, expect=200)
    body = reply.body
    assert {k: body[k] for k in ("status", "position", "last_action", "last_price", "timestamp")} == {
        "status": "running", "position": "bought", "last_action": "BUY", "last_price": 1500.5, "timestamp": moment}
    assert body["next_buy_at"] is None and body["next_sell_at"] and body["needs_login"] is False
    # Money: the BUY's fill price from runtime until its row lands, quantity from the run's config.
    assert (body["entry_average_price"], body["filled_quantity"], body["exit_average_price"], body["realized_pnl"],
            body["unrealized_pnl"]) == (1500.5, 10, None, None, None)
    await redis.set(keys.price_key("INFY"), "1490.25")
    body = (await api.v1("GET", f"/strategies/{sid}/status", user=user)).body
    assert body["unrealized_pnl"] == round((1490.25 - 1500.5) * 10, 2)
    await redis.set(keys.price_key("INFY"), "1490.25")
    assert (await api.v1("GET", f"/strategies/{sid}/status", user=user)).body["last_price"] == 1490.25


async def test_status_of_a_never_started_strategy(api) -> None:
    user = await api.connected_user()
    strategy = await api.strategy(user)
    body = (await api.v1("GET", f"/strategies/{strategy['id']}/status", user=user, expect=200)).body
    assert body["status"] == "created" and body["position"] == "none" and body["last_action"] is None


@pytest.mark.parametrize("fills, position, action", [
    ([], "none", None),
    ([("BUY", "success")], "bought", "BUY"),
    ([("BUY", "success"), ("SELL", "success")], "sold", "SELL"),
    ([("BUY", "success"), ("STOPLOSS", "success")], "exited_by_sl", "STOPLOSS"),
    ([("BUY", "success"), ("SELL", "failed"), ("RETRY", "success")], "bought", "BUY"),
    ([("BUY", "skipped")], "none", None),
])
async def test_status_after_the_run_is_derived_from_the_order_log(api, clean_db, fills, position, action) -> None:
    user, strategy = await running(api)
    sid = strategy["id"]
    await api.v1("POST", "/strategies/stop", {"strategy_id": sid}, user=user, expect=200)
    now = datetime.now(UTC)
    # A success from an earlier run does not count for this one.
    add_log(clean_db, sid, user.id, "SELL", "success", now - timedelta(days=3))
    for i, (event_type, status) in enumerate(fills):
        add_log(clean_db, sid, user.id, event_type, status, now + timedelta(seconds=i))
    body = (await api.v1("GET", f"/strategies/{sid}/status", user=user, expect=200)).body
    assert (body["status"], body["position"], body["last_action"]) == ("stopped", position, action)


async def test_orders_are_newest_first_and_limited(api, clean_db) -> None:
    user, strategy = await running(api)
    sid = strategy["id"]
    now = datetime.now(UTC)
    first = add_log(clean_db, sid, user.id, "BUY", "success", now, order_id="100")
    second = add_log(clean_db, sid, user.id, "SELL", "success", now + timedelta(seconds=5), order_id="101")
    rows = (await api.v1("GET", f"/strategies/{sid}/orders", user=user, expect=200)).body
    assert [r["id"] for r in rows] == [second, first]
    assert rows[0]["broker_order_id"] == "101" and rows[0]["event_type"] == "SELL"
    assert rows[0]["request_payload"] == {"qty": 1} and rows[0]["status"] == "success"
    limited = (await api.v1("GET", f"/strategies/{sid}/orders?limit=1", user=user, expect=200)).body
    assert [r["id"] for r in limited] == [second]


@pytest.mark.parametrize("limit", ["0", "1001", "abc", "-1", "²", "1.5"])
async def test_orders_limit_is_validated(api, limit) -> None:
    user = await api.connected_user()
    strategy = await api.strategy(user)
    reply = await api.v1("GET", f"/strategies/{strategy['id']}/orders?limit={limit}", user=user)
    assert reply.status == 422 and reply.body["error"]["details"][0]["loc"] == ["query", "limit"]


async def test_status_needs_a_token(api) -> None:
    assert (await api.v1("GET", f"/strategies/{uuid.uuid4()}/status")).status == 401
    assert (await api.v1("GET", f"/strategies/{uuid.uuid4()}/orders")).status == 401
