"""Strategy CRUD: validation rules, the broker's instrument list, isolation between users."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.schema import keys
from libs.trading.calendar import IST
from tests.integration.api_support import clock

pytest_plugins = ["tests.integration.api_support"]

GOOD = {"symbol": "INFY", "buy_time": "10:00:00", "sell_time": "15:00:00", "stop_loss": 1400.5, "quantity": 10}


def locs(reply) -> list[list]:
    assert reply.status == 422, reply.text
    return [d["loc"] for d in reply.body["error"]["details"]]


async def test_create_returns_the_strategy_created(api) -> None:
    user = await api.connected_user()
    body = (await api.v1("POST", "/strategies", GOOD | {"symbol": " infy "}, user=user, expect=201)).body
    assert body["status"] == "created" and body["symbol"] == "INFY"
    assert (body["buy_time"], body["sell_time"], body["stop_loss"], body["quantity"]) == (
        "10:00:00", "15:00:00", 1400.5, 10)
    assert body["started_at"] is None and body["stopped_at"] is None
    fetched = await api.v1("GET", f"/strategies/{body['id']}", user=user, expect=200)
    assert fetched.body == body


@pytest.mark.parametrize("change, loc", [
    ({"symbol": "IN FY"}, ["symbol"]), ({"symbol": ""}, ["symbol"]), ({"symbol": 5}, ["symbol"]),
    ({"symbol": "X" * 31}, ["symbol"]),
    ({"buy_time": "9:30"}, ["buy_time"]), ({"buy_time": "25:00:00"}, ["buy_time"]),
    ({"sell_time": "15:00"}, ["sell_time"]), ({"buy_time": None}, ["buy_time"]),
    ({"stop_loss": 0}, ["stop_loss"]), ({"stop_loss": -1.5}, ["stop_loss"]),
    ({"stop_loss": 1400.123}, ["stop_loss"]), ({"stop_loss": "1400"}, ["stop_loss"]),
    ({"quantity": 0}, ["quantity"]), ({"quantity": 100_001}, ["quantity"]), ({"quantity": 1.5}, ["quantity"]),
    ({"quantity": True}, ["quantity"]), ({"quantity": "10"}, ["quantity"]),
    ({"colour": "red"}, ["colour"]),
    ({"buy_time": "15:00:00", "sell_time": "10:00:00"}, []),
    ({"buy_time": "10:00:00", "sell_time": "10:00:00"}, []),
])
async def test_create_validation(api, change, loc) -> None:
    user = await api.connected_user()
    found = locs(await api.v1("POST", "/strategies", GOOD | change, user=user))
    assert loc in found


async def test_missing_fields_are_each_named(api) -> None:
    user = await api.connected_user()
    found = locs(await api.v1("POST", "/strategies", {}, user=user))
    assert sorted(found) == [["buy_time"], ["quantity"], ["sell_time"], ["stop_loss"], ["symbol"]]


async def test_symbol_must_be_in_the_brokers_nse_list_cached_per_day(api, redis) -> None:
    user = await api.connected_user()
    reply = await api.v1("POST", "/strategies", GOOD | {"symbol": "NOSUCHCO"}, user=user)
    assert reply.status == 422 and reply.body["error"]["code"] == "unknown_symbol"
    assert reply.body["error"]["details"][0]["loc"] == ["symbol"]
    day = datetime.now(UTC).astimezone(IST).date()
    key = keys.instruments_key("NSE", day)
    assert await redis.hget(key, "INFY") == b"408065"
    assert 0 < await redis.ttl(key) <= 2 * 86400
    # The cache answers from now on, even for a user whose broker is gone.
    api.sim.expire(user.broker["api_key"])
    await api.strategy(user, symbol="RELIANCE")


async def test_create_without_a_broker_is_409_connect_first(api) -> None:
    user = await api.user()
    reply = await api.v1("POST", "/strategies", GOOD, user=user)
    assert reply.status == 409 and reply.body["error"]["code"] == "broker_not_connected"
    assert "/broker/connect" in reply.body["error"]["message"]


async def test_create_with_an_expired_broker_token_is_409_and_marks_it_invalid(api) -> None:
    user = await api.connected_user()
    api.sim.expire(user.broker["api_key"])
    reply = await api.v1("POST", "/strategies", GOOD, user=user)
    assert reply.status == 409 and reply.body["error"]["code"] == "broker_credentials_invalid"
    assert (await api.v1("GET", "/broker", user=user)).body["is_valid"] is False
    again = await api.v1("POST", "/strategies", GOOD, user=user)
    assert again.status == 409 and again.body["error"]["code"] == "broker_credentials_invalid"


async def test_nse_calendar_keeps_times_inside_the_session(api_factory) -> None:
    api = await api_factory(market_calendar="nse", sell_safety_margin_s=300)
    user = await api.connected_user()
    early = await api.v1("POST", "/strategies", GOOD | {"buy_time": "09:15:00"}, user=user)
    assert early.status == 422 and early.body["error"]["code"] == "outside_session"
    assert early.body["error"]["details"][0]["loc"] == ["buy_time"]
    late = await api.v1("POST", "/strategies", GOOD | {"sell_time": "15:16:00"}, user=user)
    assert late.status == 422 and late.body["error"]["details"][0]["loc"] == ["sell_time"]
    await api.v1("POST", "/strategies", GOOD | {"buy_time": "09:15:01", "sell_time": "15:15:00"}, user=user,
                 expect=201)


async def test_always_open_calendar_allows_any_time(api) -> None:
    user = await api.connected_user()
    await api.v1("POST", "/strategies", GOOD | {"buy_time": "00:00:01", "sell_time": "23:59:59"}, user=user,
                 expect=201)


async def test_list_shows_only_the_callers_strategies(api) -> None:
    ann, bob = await api.connected_user("Ann"), await api.connected_user("Bob")
    a1, a2 = await api.strategy(ann), await api.strategy(ann, symbol="TCS")
    b1 = await api.strategy(bob)
    assert [s["id"] for s in (await api.v1("GET", "/strategies", user=ann, expect=200)).body] == [a1["id"], a2["id"]]
    assert [s["id"] for s in (await api.v1("GET", "/strategies", user=bob, expect=200)).body] == [b1["id"]]


async def test_another_users_strategy_is_404_everywhere(api) -> None:
    ann, bob = await api.connected_user("Ann"), await api.connected_user("Bob")
    theirs = (await api.strategy(ann))["id"]
    for method, path, body in [
        ("GET", f"/strategies/{theirs}", None), ("PATCH", f"/strategies/{theirs}", {"quantity": 1}),
        ("DELETE", f"/strategies/{theirs}", None), ("GET", f"/strategies/{theirs}/status", None),
        ("GET", f"/strategies/{theirs}/orders", None), ("POST", "/strategies/start", {"strategy_id": theirs}),
        ("POST", "/strategies/stop", {"strategy_id": theirs}),
    ]:
        reply = await api.v1(method, path, body, user=bob)
        assert reply.status == 404 and reply.body["error"]["code"] == "not_found", (method, path, reply.text)
    assert (await api.v1("GET", f"/strategies/{theirs}", user=ann)).body["status"] == "created"


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000"])
async def test_unknown_ids_are_404(api, bad_id) -> None:
    user = await api.connected_user()
    assert (await api.v1("GET", f"/strategies/{bad_id}", user=user)).status == 404
    assert (await api.v1("DELETE", f"/strategies/{bad_id}", user=user)).status == 404


async def test_patch_changes_only_given_fields(api) -> None:
    user = await api.connected_user()
    created = await api.strategy(user, buy_time="10:00:00", sell_time="11:00:00")
    reply = await api.v1("PATCH", f"/strategies/{created['id']}", {"quantity": 3, "symbol": "TCS"}, user=user,
                         expect=200)
    assert reply.body["quantity"] == 3 and reply.body["symbol"] == "TCS"
    assert reply.body["buy_time"] == "10:00:00" and reply.body["stop_loss"] == created["stop_loss"]
    assert (await api.v1("PATCH", f"/strategies/{created['id']}", {}, user=user, expect=200)).body["quantity"] == 3


@pytest.mark.parametrize("change, loc, code", [
    ({"buy_time": "12:00:00"}, ["sell_time"], "validation_error"),  # after the stored sell_time 11:00:00
    ({"sell_time": "09:00:00"}, ["sell_time"], "validation_error"),
    ({"quantity": None}, ["quantity"], "validation_error"),
    ({"symbol": "NOSUCHCO"}, ["symbol"], "unknown_symbol"),
    ({"stop_loss": 0.001}, ["stop_loss"], "validation_error"),
    ({"status": "running"}, ["status"], "validation_error"),
])
async def test_patch_validation(api, change, loc, code) -> None:
    user = await api.connected_user()
    created = await api.strategy(user, buy_time="10:00:00", sell_time="11:00:00")
    reply = await api.v1("PATCH", f"/strategies/{created['id']}", change, user=user)
    assert reply.status == 422 and reply.body["error"]["code"] == code, reply.text
    assert loc in [d["loc"] for d in reply.body["error"]["details"]]


async def test_patch_and_delete_are_409_while_running(api) -> None:
    user = await api.connected_user()
    created = await api.strategy(user, buy_time=clock(600), sell_time=clock(1200))
    await api.v1("POST", "/strategies/start", {"strategy_id": created["id"]}, user=user, expect=200)
    patch = await api.v1("PATCH", f"/strategies/{created['id']}", {"quantity": 2}, user=user)
    assert patch.status == 409 and patch.body["error"]["code"] == "strategy_running"
    delete = await api.v1("DELETE", f"/strategies/{created['id']}", user=user)
    assert delete.status == 409 and delete.body["error"]["code"] == "strategy_running"
    await api.v1("POST", "/strategies/stop", {"strategy_id": created["id"]}, user=user, expect=200)
    await api.v1("PATCH", f"/strategies/{created['id']}", {"quantity": 2}, user=user, expect=200)


async def test_delete_removes_the_strategy(api) -> None:
    user = await api.connected_user()
    created = await api.strategy(user)
    reply = await api.v1("DELETE", f"/strategies/{created['id']}", user=user)
    assert reply.status == 204 and reply.text == ""
    assert (await api.v1("GET", f"/strategies/{created['id']}", user=user)).status == 404
    assert (await api.v1("DELETE", f"/strategies/{created['id']}", user=user)).status == 404
