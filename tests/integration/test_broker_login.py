"""The daily Kite login through the simulator's login page: state checks, exchange, token state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import pytest

from services.api.deps import TOKENS
from services.api.kite_login import STATE_PURPOSE, sign_state
from tests.integration.api_support import ApiHarness, Reply, User
from tests.support.kite_login import press_login

pytest_plugins = ["tests.integration.api_support"]

JSON = {"Accept": "application/json"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
async def api(api_factory: Any, sim: Any) -> ApiHarness:
    return await api_factory(kite_login_root=sim.base_url)


async def kite_user(api: ApiHarness, name: str = "Asha") -> User:
    """A user whose paper Kite app redirects to this API's callback."""
    user = await api.user(name)
    callback = str(api.client.make_url("/api/v1/broker/callback"))
    account = api.sim.call("POST", "/sim/accounts", {"user_name": name, "redirect_url": callback})
    user.broker = account
    await api.v1("POST", "/broker/connect", {k: account[k] for k in ("api_key", "api_secret", "access_token")},
                 user=user, expect=200)
    return user


async def callback_path(api: ApiHarness, http: aiohttp.ClientSession, user: User) -> str:
    """Return the callback path (with query) Kite redirects to after the user logs in."""
    login = await api.v1("GET", "/broker/login", user=user, expect=200)
    assert login.body["login_url"].startswith(api.sim.base_url + "/connect/login?v=3&api_key=")
    location = await press_login(http, login.body["login_url"])
    parts = urlsplit(location)
    assert parts.path == "/api/v1/broker/callback"
    query = parse_qs(parts.query)
    assert query["action"] == ["login"] and query["status"] == ["success"] and query["request_token"]
    return f"{parts.path}?{parts.query}"


async def get(api: ApiHarness, path: str, *, user: User | None = None,
              headers: dict[str, str] | None = None) -> Reply:
    """GET without following redirects (the callback answers browsers with a 303)."""
    hdrs = {**(headers or {}), **(user.auth if user else {})}
    async with api.client.get(path, headers=hdrs, allow_redirects=False) as resp:
        text = await resp.text()
        body = orjson.loads(text) if resp.content_type == "application/json" and text else None
        return Reply(resp.status, body, text, resp.headers)


def dashboard_params(reply: Any) -> dict[str, str]:
    assert reply.status == 303, reply.text
    location = reply.headers["Location"]
    assert location.startswith("/?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def test_login_through_the_kite_page_stores_a_fresh_valid_token(api: ApiHarness,
                                                                      http: aiohttp.ClientSession) -> None:
    user = await kite_user(api)
    old_token = user.broker["access_token"]
    path = await callback_path(api, http, user)
    assert dashboard_params(await get(api, path)) == {"broker_login": "success"}
    broker = (await api.v1("GET", "/broker", user=user, expect=200)).body
    assert broker["is_valid"] is True and broker["token_state"] == "valid"
    assert broker["token_checked_at"] and broker["token_expires_at"].endswith(("T00:30:00Z", "T00:30:00+00:00"))
    # The simulator rotated the token at the exchange: the stored one is the new one (start checks it).
    strategy = await api.strategy(user, buy_time="10:00:00", sell_time="11:00:00")
    started = await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user, expect=200)
    assert started.body["status"] == "running" and started.body["trading_day"]
    assert old_token not in "".join(api.texts)


async def test_replayed_state_is_refused(api: ApiHarness, http: aiohttp.ClientSession) -> None:
    user = await kite_user(api)
    path = await callback_path(api, http, user)
    assert dashboard_params(await get(api, path))["broker_login"] == "success"
    again = dashboard_params(await get(api, path))
    assert again["broker_login"] == "error" and again["code"] == "login_state_replayed"
    assert "already used" in again["message"]


async def test_tampered_state_is_refused_before_any_exchange(api: ApiHarness, http: aiohttp.ClientSession) -> None:
    user, other = await kite_user(api), await kite_user(api, "Ravi")
    path = await callback_path(api, http, user)
    query = parse_qs(urlsplit(path).query)
    payload, mac = query["state"][0].split(".")
    # The other user's id in the payload, the signature kept: refused.
    forged = sign_state(b"not-the-key", other.id, "fp", 600)
    for state in (forged, forged.split(".")[0] + "." + mac, payload + "x." + mac, "garbage"):
        reply = await get(api, f"/api/v1/broker/callback?status=success&request_token="
                                      f"{query['request_token'][0]}&state={state}", headers=JSON)
        assert reply.status == 400 and reply.body["error"]["code"] == "login_state_invalid", reply.text
    # The untouched state still works: refusals consumed nothing.
    assert dashboard_params(await get(api, path))["broker_login"] == "success"


async def test_expired_state_is_refused(api: ApiHarness) -> None:
    user = await kite_user(api)
    state = sign_state(api.app[TOKENS].derive(STATE_PURPOSE), user.id, "fp", -1)
    reply = await get(api, f"/api/v1/broker/callback?status=success&request_token=abc&state={state}")
    params = dashboard_params(reply)
    assert params["code"] == "login_state_expired" and "expired" in params["message"]


async def test_another_users_state_is_refused_for_a_signed_in_user(api: ApiHarness,
                                                                   http: aiohttp.ClientSession) -> None:
    asha, ravi = await kite_user(api), await kite_user(api, "Ravi")
    path = await callback_path(api, http, ravi)
    reply = await get(api, path, user=asha, headers=JSON)
    assert reply.status == 403 and reply.body["error"]["code"] == "login_state_other_user"
    assert (await api.v1("GET", "/broker", user=asha, expect=200)).body["api_key_hint"] != ""


async def test_a_login_kite_did_not_complete_or_refused_is_an_error(api: ApiHarness,
                                                                    http: aiohttp.ClientSession) -> None:
    user = await kite_user(api)
    path = await callback_path(api, http, user)
    failed = dashboard_params(await get(api, path.replace("status=success", "status=cancelled")))
    assert failed["code"] == "broker_login_failed"
    login = await api.v1("GET", "/broker/login", user=user, expect=200)
    state = parse_qs(parse_qs(urlsplit(login.body["login_url"]).query)["redirect_params"][0])["state"][0]
    refused = await get(api, f"/api/v1/broker/callback?action=login&status=success"
                                    f"&request_token=not-issued&state={state}", headers=JSON)
    assert refused.status == 422 and refused.body["error"]["code"] == "broker_session_rejected"
    broker = (await api.v1("GET", "/broker", user=user, expect=200)).body
    assert broker["is_valid"] is True  # the stored token was left alone


async def test_login_needs_a_connected_broker(api: ApiHarness) -> None:
    user = await api.user()
    reply = await api.v1("GET", "/broker/login", user=user)
    assert reply.status == 409 and reply.body["error"]["code"] == "broker_not_connected"
    anonymous = await api.v1("GET", "/broker/login")
    assert anonymous.status == 401 and anonymous.body["error"]["code"]


async def test_start_with_an_expired_token_is_refused_and_broker_says_so(api_factory: Any, sim: Any) -> None:
    # No cache: connect has just recorded a `valid` answer, which start would otherwise reuse for 30 s.
    api = await api_factory(kite_login_root=sim.base_url, token_check_cache_s=0)
    user = await kite_user(api)
    strategy = await api.strategy(user, buy_time="10:00:00", sell_time="11:00:00")
    api.sim.expire(user.broker["api_key"])
    reply = await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user)
    assert reply.status == 409 and reply.body["error"]["code"] == "broker_credentials_invalid", reply.text
    broker = (await api.v1("GET", "/broker", user=user, expect=200)).body
    assert broker["is_valid"] is False and broker["token_state"] == "expired"
