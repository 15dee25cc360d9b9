"""Broker credentials: verified with the paper broker, encrypted at rest, rotated, never shown."""

from __future__ import annotations

import psycopg
import pytest

from libs.broker.kite import api_key_fingerprint
from libs.schema import keys
from libs.service.secretbox import SecretBox, generate_key
from services.api.app import build_app
from services.api.security import MissingSecretKey
from tests.integration.api_support import PASSWORD, SECRET_KEY, make_settings

pytest_plugins = ["tests.integration.api_support"]

SECRETS = ("api_key", "api_secret", "access_token")


def credential_row(database_url: str, user_id: str) -> dict:
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT * FROM broker_credentials WHERE user_id = %s", (user_id,))
        names = [c.name for c in cur.description]
        row = cur.fetchone()
    return dict(zip(names, row, strict=True)) if row else {}


def aad(user_id: str, column: str) -> str:
    return f"broker_credentials:{user_id}:{column}"


async def test_connect_verifies_with_the_broker_and_stores_ciphertext(api, clean_db, redis) -> None:
    user = await api.user("Ann")
    account = api.sim.create_account(user_name="Ann Paper")
    reply = await api.v1("POST", "/broker/connect", {k: account[k] for k in SECRETS}, user=user, expect=200)
    assert reply.body == {"is_valid": True, "api_key_hint": "****" + account["api_key"][-4:],
                          "user_name": "Ann Paper"}
    row = credential_row(clean_db, user.id)
    box = SecretBox.from_b64(SECRET_KEY)
    assert row["is_valid"] is True and row["key_id"] == box.current_key_id
    for column in SECRETS:
        assert account[column] not in row[column]
        assert box.decrypt(row[column], aad(user.id, column)) == account[column]
    # The ciphertext is bound to its row and column: swapped, it does not decrypt.
    with pytest.raises(Exception, match="decrypt"):
        box.decrypt(row["api_secret"], aad(user.id, "access_token"))
    cached = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.broker_credentials_key(user.id))).items()}
    assert cached == {"api_key": row["api_key"], "access_token": row["access_token"],
                      "api_key_fp": api_key_fingerprint(account["api_key"]), "is_valid": "1", "token_state": "valid"}


async def test_broker_status_shows_a_hint_and_never_a_secret(api) -> None:
    user = await api.user("Bob")
    assert (await api.v1("GET", "/broker", user=user, expect=200)).body == {
        "connected": False, "is_valid": False, "api_key_hint": None, "updated_at": None, "token_state": "unknown",
        "token_checked_at": None, "token_expires_at": None}
    account = await api.connect(user)
    reply = await api.v1("GET", "/broker", user=user, expect=200)
    assert reply.body["connected"] is True and reply.body["is_valid"] is True
    assert reply.body["api_key_hint"] == "****" + account["api_key"][-4:]
    for column in SECRETS:
        assert account[column] not in reply.text


async def test_invalid_credentials_are_422_with_the_brokers_reason_and_stored_invalid(api, clean_db, redis) -> None:
    user = await api.user("Cid")
    account = api.sim.create_account()
    body = {"api_key": account["api_key"], "api_secret": account["api_secret"], "access_token": "wrong-token-1"}
    reply = await api.v1("POST", "/broker/connect", body, user=user)
    assert reply.status == 422
    assert reply.body["error"]["code"] == "broker_credentials_invalid"
    assert "Incorrect `api_key` or `access_token`" in reply.body["error"]["message"]
    assert credential_row(clean_db, user.id)["is_valid"] is False
    assert (await redis.hget(keys.broker_credentials_key(user.id), "is_valid")) == b"0"
    assert (await api.v1("GET", "/broker", user=user)).body["is_valid"] is False


async def test_expired_token_is_invalid(api) -> None:
    user = await api.user("Dee")
    account = api.sim.create_account()
    api.sim.expire(account["api_key"])
    reply = await api.v1("POST", "/broker/connect", {k: account[k] for k in SECRETS}, user=user)
    assert reply.status == 422 and reply.body["error"]["code"] == "broker_credentials_invalid"


@pytest.mark.parametrize("body, loc", [
    ({"api_key": "k", "api_secret": "s"}, ["access_token"]),
    ({"api_key": "has space", "api_secret": "s", "access_token": "t"}, ["api_key"]),
    ({"api_key": "k", "api_secret": "s", "access_token": "x" * 201}, ["access_token"]),
    ({"api_key": "kéy", "api_secret": "s", "access_token": "t"}, ["api_key"]),
    ({"api_key": 123, "api_secret": "s", "access_token": "t"}, ["api_key"]),
    ({"api_key": "k", "api_secret": "s", "access_token": "t", "extra": 1}, ["extra"]),
])
async def test_connect_validation(api, body, loc) -> None:
    user = await api.user("Eve")
    reply = await api.v1("POST", "/broker/connect", body, user=user)
    assert reply.status == 422
    assert loc in [d["loc"] for d in reply.body["error"]["details"]]


async def test_connect_needs_a_token(api) -> None:
    reply = await api.v1("POST", "/broker/connect", {"api_key": "k", "api_secret": "s", "access_token": "t"})
    assert reply.status == 401


async def test_session_exchanges_a_request_token_for_the_new_access_token(api, clean_db, redis) -> None:
    user = await api.connected_user("Fay")
    old_token = user.broker["access_token"]
    request_token = api.sim.request_token(user.broker["api_key"])
    reply = await api.v1("POST", "/broker/session", {"request_token": request_token}, user=user, expect=200)
    assert reply.body["is_valid"] is True
    row = credential_row(clean_db, user.id)
    new_token = SecretBox.from_b64(SECRET_KEY).decrypt(row["access_token"], aad(user.id, "access_token"))
    assert new_token != old_token and len(new_token) > 8
    assert (await redis.hget(keys.broker_credentials_key(user.id), "access_token")).decode() == row["access_token"]
    # The new token works: strategies can be created with it (instrument list fetched with it).
    await api.strategy(user)
    # A request token is single-use; the broker's refusal comes back as 422.
    again = await api.v1("POST", "/broker/session", {"request_token": request_token}, user=user)
    assert again.status == 422 and again.body["error"]["code"] == "broker_session_rejected"


async def test_session_refreshes_an_expired_token(api) -> None:
    user = await api.connected_user("Gil")
    api.sim.expire(user.broker["api_key"])
    request_token = api.sim.request_token(user.broker["api_key"])
    await api.v1("POST", "/broker/session", {"request_token": request_token}, user=user, expect=200)
    assert (await api.v1("GET", "/broker", user=user)).body["is_valid"] is True


async def test_session_before_connect_is_409(api) -> None:
    user = await api.user("Hal")
    reply = await api.v1("POST", "/broker/session", {"request_token": "abc"}, user=user)
    assert reply.status == 409 and reply.body["error"]["code"] == "broker_not_connected"


async def test_key_rotation_reencrypts_on_read_under_the_new_key(api_factory, clean_db, redis) -> None:
    old_key, new_key = SECRET_KEY, generate_key()
    first = await api_factory()
    user = await first.connected_user("Ivy")
    assert credential_row(clean_db, user.id)["key_id"] == SecretBox.from_b64(old_key).current_key_id
    rotated = await api_factory(secret_key=new_key, secret_keys_retired=old_key)
    # The token key derives from the secret key (no TICKWISE_JWT_SECRET here): log in again.
    login = await rotated.v1("POST", "/auth/login", {"email": user.email, "password": PASSWORD}, expect=200)
    user.token = login.body["access_token"]
    strategy = await rotated.strategy(user)  # reads the credentials (instrument list)
    await rotated.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user, expect=200)
    row = credential_row(clean_db, user.id)
    new_box = SecretBox.from_b64(new_key)
    assert row["key_id"] == new_box.current_key_id
    for column in SECRETS:
        assert new_box.key_id(row[column]) == new_box.current_key_id
        assert new_box.decrypt(row[column], aad(user.id, column)) == user.broker[column]
    assert (await redis.hget(keys.broker_credentials_key(user.id), "api_key")).decode() == row["api_key"]
    # Without the retired key the old app can no longer read them: they truly moved.
    with pytest.raises(Exception, match="no key"):
        SecretBox.from_b64(old_key).decrypt(row["api_secret"], aad(user.id, "api_secret"))


async def test_unreadable_credentials_ask_to_reconnect(api_factory) -> None:
    first = await api_factory()
    user = await first.connected_user("Jay")
    other = await api_factory(secret_key=generate_key(), jwt_secret="x" * 32)  # the old key is gone entirely
    login = await other.v1("POST", "/auth/login", {"email": user.email, "password": PASSWORD}, expect=200)
    user.token = login.body["access_token"]
    reply = await other.v1("POST", "/strategies", {"symbol": "INFY", "buy_time": "10:00:00",
                                                   "sell_time": "11:00:00", "stop_loss": 1, "quantity": 1},
                           user=user)
    assert reply.status == 409 and reply.body["error"]["code"] == "broker_credentials_unreadable"


def test_the_api_refuses_to_start_without_a_secret_key(redis_url, database_url) -> None:
    settings = make_settings(redis_url, database_url, "http://127.0.0.1:9", secret_key="")
    with pytest.raises(MissingSecretKey):
        build_app(settings)


def test_dev_mode_runs_with_an_ephemeral_key_and_says_so_loudly(redis_url, database_url, logs) -> None:
    settings = make_settings(redis_url, database_url, "http://127.0.0.1:9", secret_key="", dev_mode=True)
    build_app(settings)
    assert "EPHEMERAL" in logs.getvalue() and '"level": "warning"' in logs.getvalue()


async def test_no_response_or_log_line_contains_a_secret(api, logs) -> None:
    user = await api.connected_user("Kim")
    request_token = api.sim.request_token(user.broker["api_key"])
    session = await api.v1("POST", "/broker/session", {"request_token": request_token}, user=user, expect=200)
    assert session.status == 200
    bad, other = api.sim.create_account(), await api.user("Lee")
    await api.v1("POST", "/broker/connect", {"api_key": bad["api_key"], "api_secret": bad["api_secret"],
                                             "access_token": "nope-" + bad["access_token"]}, user=other, expect=422)
    strategy = await api.strategy(user)
    await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user)
    await api.v1("GET", "/broker", user=user)
    await api.v1("POST", "/auth/login", {"email": user.email, "password": PASSWORD + "x"})
    await api.v1("POST", "/auth/register", {"email": "x@example.com", "password": "short", "name": "x"})
    captured = logs.getvalue() + "\n".join(api.texts)
    assert "request handled" in captured
    secrets = [user.broker[c] for c in SECRETS] + [bad["api_key"], bad["api_secret"], "nope-" + bad["access_token"],
                                                   request_token, PASSWORD, PASSWORD + "x"]
    for secret in [*secrets, user.token]:
        assert secret not in logs.getvalue(), "a secret reached the logs"
    responses = "\n".join(api.texts)
    for secret in secrets:  # (the bearer token is, of course, in the login response)
        assert secret not in responses, "a secret reached a response"


@pytest.mark.parametrize("body, loc", [
    ({}, ["request_token"]), ({"request_token": ""}, ["request_token"]),
    ({"request_token": "a b"}, ["request_token"]), ({"request_token": "tökén"}, ["request_token"]),
    ({"request_token": "abc", "api_secret": "x"}, ["api_secret"]),
])
async def test_session_validation(api, body, loc) -> None:
    user = await api.connected_user("Max")
    reply = await api.v1("POST", "/broker/session", body, user=user)
    assert reply.status == 422
    assert loc in [d["loc"] for d in reply.body["error"]["details"]]


async def test_one_users_broker_state_is_invisible_to_another(api) -> None:
    ann, bob = await api.connected_user("Ann"), await api.user("Bob")
    assert (await api.v1("GET", "/broker", user=bob)).body["connected"] is False
    assert (await api.v1("GET", "/broker", user=ann)).body["connected"] is True


async def test_connecting_another_account_while_a_strategy_runs_is_409(api, redis) -> None:
    """Exits go through `broker:{user}`: a new account mid-run would sell what it never bought."""
    user = await api.connected_user()
    old = user.broker
    strategy = await api.strategy(user)
    await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user, expect=200)
    before = await redis.hgetall(keys.broker_credentials_key(user.id))
    other = api.sim.create_account(user_name="Other")
    reply = await api.v1("POST", "/broker/connect", {k: other[k] for k in SECRETS}, user=user, expect=409)
    assert reply.body["error"]["code"] == "broker_account_in_use"
    assert await redis.hgetall(keys.broker_credentials_key(user.id)) == before
    # The same account with a fresh token is fine mid-run; another account once stopped too.
    await api.v1("POST", "/broker/connect", {k: old[k] for k in SECRETS}, user=user, expect=200)
    await api.v1("POST", "/strategies/stop", {"strategy_id": strategy["id"]}, user=user, expect=200)
    await api.v1("POST", "/broker/connect", {k: other[k] for k in SECRETS}, user=user, expect=200)
    assert (await redis.hget(keys.broker_credentials_key(user.id), "api_key_fp")).decode() == \
        api_key_fingerprint(other["api_key"])
