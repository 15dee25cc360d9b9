"""The notification deliverer in the API: Telegram through a configurable Bot API base, dead letters after the limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from libs.schema import keys
from tests.support.eventually import eventually
from tests.support.receiver import serve_on_loopback

pytest_plugins = ["tests.integration.api_support"]

BOT_TOKEN = "123456:test-bot-token"


@dataclass
class Receiver:
    """Loopback stand-in for the Telegram Bot API and for a webhook that always fails."""

    base: str = ""
    telegram: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    failures: int = 0

    async def send_message(self, request: web.Request) -> web.Response:
        self.telegram.append((request.path, await request.json()))
        return web.json_response({"ok": True, "result": {}})

    async def broken(self, request: web.Request) -> web.Response:
        await request.read()
        self.failures += 1
        return web.Response(status=500)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    routes = [web.post("/bot{token}/sendMessage", found.send_message), web.post("/broken", found.broken)]
    async with serve_on_loopback(routes) as base:
        found.base = base
        yield found


async def test_telegram_messages_go_to_the_configured_bot_api(api_factory, receiver: Receiver) -> None:
    api = await api_factory(notify_enabled=True, telegram_bot_token=BOT_TOKEN, telegram_api_base=receiver.base,
                            notify_backoff_base_s=0.05)
    user = await api.user()
    out = (await api.v1("PUT", "/notifications", {"telegram_chat_id": "987654321"}, user=user, expect=200)).body
    assert out["telegram_available"] is True and out["telegram_chat_id"] == "987654321"
    await api.v1("POST", "/notifications/test", {}, user=user, expect=202)
    await eventually(lambda: receiver.telegram, timeout=10, interval=0.05)
    path, body = receiver.telegram[0]
    assert path == f"/bot{BOT_TOKEN}/sendMessage"
    assert body["chat_id"] == "987654321" and body["text"] == "Tickwise test notification."
    assert BOT_TOKEN not in "".join(api.texts)  # the operator's token never reaches a user


async def test_a_delivery_that_keeps_failing_is_dead_lettered_after_the_limit(api_factory, redis,
                                                                             receiver: Receiver) -> None:
    api = await api_factory(notify_enabled=True, notify_max_attempts=3, notify_backoff_base_s=0.05,
                            notify_backoff_cap_s=0.1)
    user = await api.user()
    await api.v1("PUT", "/notifications", {"webhook_url": receiver.base + "/broken"}, user=user, expect=200)
    queued = (await api.v1("POST", "/notifications/test", {}, user=user, expect=202)).body["queued"]
    dead = await eventually(lambda: redis.xrange(keys.NOTIFY_DEAD_STREAM), timeout=15, interval=0.05)
    assert len(dead) == 1
    fields = dead[0][1]
    assert orjson.loads(fields[b"notice"])["id"] == queued
    assert (fields[b"channel"], fields[b"attempts"]) == (b"webhook", b"3")
    assert b"500" in fields[b"error"]
    assert receiver.failures == 3
    assert await redis.zcard(keys.NOTIFY_SCHEDULE) == 0 and await redis.hlen(keys.NOTIFY_PENDING) == 0


async def test_telegram_needs_the_operators_bot(api) -> None:
    user = await api.user()
    reply = await api.v1("PUT", "/notifications", {"telegram_chat_id": "42"}, user=user, expect=422)
    assert reply.body["error"]["details"][0]["loc"] == ["telegram_chat_id"]
    assert "not set up" in reply.body["error"]["message"]
