"""Positions and quotes from the broker: broker failures answer in the one JSON error shape."""

from __future__ import annotations

import pytest

from libs.schema import keys

pytest_plugins = ["tests.integration.api_support"]


async def test_positions_without_a_broker_say_what_to_do(api) -> None:
    user = await api.user()
    reply = await api.v1("GET", "/positions", user=user, expect=409)
    assert reply.body["error"]["code"] == "broker_not_connected"


async def test_positions_when_the_broker_fails_or_refuses_the_token(api, sim) -> None:
    user = await api.connected_user()
    assert (await api.v1("GET", "/positions", user=user, expect=200)).body == []
    sim.set_faults(error_rate=1.0, routes=["portfolio"])
    try:
        reply = await api.v1("GET", "/positions", user=user, expect=503)
    finally:
        sim.set_faults()
    assert reply.body["error"]["code"] == "broker_unavailable"
    sim.expire(user.broker["api_key"])
    reply = await api.v1("GET", "/positions", user=user, expect=409)
    assert reply.body["error"]["code"] == "broker_credentials_invalid"
    assert (await api.v1("GET", "/broker", user=user, expect=200)).body["is_valid"] is False


@pytest.mark.parametrize("symbol, status", [("", 422), ("inf y", 422), ("NOSUCHCO", 422)])
async def test_quote_validates_the_symbol(api, symbol: str, status: int) -> None:
    user = await api.connected_user()
    reply = await api.v1("GET", f"/quote?symbol={symbol}", user=user, expect=status)
    assert reply.body["error"]["details"][0]["loc"] == ["query", "symbol"]


async def test_quote_reads_the_broker_when_no_tick_is_known(api, redis) -> None:
    user = await api.connected_user()
    body = (await api.v1("GET", "/quote?symbol=infy", user=user, expect=200)).body
    assert body["symbol"] == "INFY" and body["source"] == "broker" and body["last_price"] > 0
    await redis.set(keys.price_key("INFY"), "1499.5")
    body = (await api.v1("GET", "/quote?symbol=INFY", user=user, expect=200)).body
    assert (body["last_price"], body["source"]) == (1499.5, "ticks")
