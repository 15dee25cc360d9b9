"""Accounts: register, log in (throttled, constant-ish time), log out, change password, delete, read.

Sessions are stateless JWTs made revocable two ways: logout puts the token's
`jti` on a deny-list in Redis until the token would have expired anyway, and a
password change or account deletion bumps `users.token_version`, which every
token carries, so every token issued before stops working at once.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import structlog
from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from libs.schema import keys
from libs.schema.models import (
    DeleteAccountRequest,
    LoginRequest,
    PasswordChangeRequest,
    RegisterRequest,
    TokenOut,
    UserOut,
)
from libs.schema.tables import BrokerCredential, Strategy, User
from services.api.deps import (
    CLAIMS,
    PASSWORDS,
    READS,
    REDIS,
    REGISTER_THROTTLE,
    SESSIONS,
    THROTTLE,
    TOKENS,
    client_addr,
    current_user,
    read_model,
    store_token_version,
)
from services.api.errors import ApiError, json_response

log = structlog.get_logger("api")


def _user_out(user: User) -> dict:
    return UserOut.model_validate(user).model_dump(mode="json")


async def register(request: web.Request) -> web.Response:
    """Create an account; an email already registered gets the same answer and nothing is created.

    Answering 409 there told anyone which addresses have accounts. The owner of
    the address already has an account and logs in (or changes the password).
    """
    body = await read_model(request, RegisterRequest)
    await request.app[REGISTER_THROTTLE].count(client_addr(request))
    password_hash = await request.app[PASSWORDS].hash(body.password)
    user = User(email=body.email, name=body.name, password_hash=password_hash)
    async with request.app[SESSIONS]() as session:
        session.add(user)
        try:
            await session.commit()
        except IntegrityError:
            log.info("registration of a taken email answered as a success")
            twin = UserOut(id=uuid.uuid4(), email=body.email, name=body.name, created_at=datetime.now(UTC))
            return json_response(twin.model_dump(mode="json"), status=201)
        await session.refresh(user)
    log.info("user registered", user_id=str(user.id))
    return json_response(_user_out(user), status=201)


async def login(request: web.Request) -> web.Response:
    """Exchange email and password for a bearer token; the same 401 for any mismatch."""
    body = await read_model(request, LoginRequest)
    throttle, addr = request.app[THROTTLE], client_addr(request)
    await throttle.reserve(body.email, addr)
    async with request.app[SESSIONS]() as session:
        user = await session.scalar(select(User).where(User.email == body.email))
        passwords = request.app[PASSWORDS]
        ok = await passwords.verify(user.password_hash if user else None, body.password)
        if not ok or user is None:
            log.info("login failed")
            raise ApiError(401, "invalid_credentials", "email or password is incorrect")
        if passwords.needs_rehash(user.password_hash):
            user.password_hash = await passwords.rehash(body.password)
            await session.commit()
    await throttle.succeeded(body.email, addr)
    tokens = request.app[TOKENS]
    out = TokenOut(access_token=tokens.issue(user.id, user.token_version), expires_in=tokens.lifetime_s)
    log.info("user logged in", user_id=str(user.id))
    return json_response(out.model_dump(mode="json"))


async def logout(request: web.Request) -> web.Response:
    """Revoke the caller's token (deny-listed until it would expire anyway)."""
    claims = request[CLAIMS]
    remaining = claims.expires_at - int(time.time())
    if remaining > 0:
        await request.app[REDIS].set(keys.revoked_token_key(claims.jti), "1", ex=remaining)
    log.info("user logged out", user_id=str(claims.user_id))
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    """Return the caller."""
    user_id = current_user(request)
    async with request.app[READS]() as session:
        user = await session.get(User, user_id)
    if user is None:
        raise ApiError(401, "invalid_token", "the access token's user no longer exists")
    return json_response(_user_out(user))


async def _confirm_password(request: web.Request, user: User | None, password: str) -> User:
    """Check the caller's password (throttled like a login); 403 if wrong."""
    if user is None:
        raise ApiError(401, "invalid_token", "the access token's user no longer exists")
    throttle, addr = request.app[THROTTLE], client_addr(request)
    await throttle.reserve(user.email, addr)
    if not await request.app[PASSWORDS].verify(user.password_hash, password):
        raise ApiError(403, "password_incorrect", "the password is incorrect")
    await throttle.succeeded(user.email, addr)
    return user


async def change_password(request: web.Request) -> web.Response:
    """Set a new password; every token issued before (this one too) stops working."""
    user_id = current_user(request)
    body = await read_model(request, PasswordChangeRequest)
    async with request.app[READS]() as session:
        user = await _confirm_password(request, await session.get(User, user_id), body.current_password)
    password_hash = await request.app[PASSWORDS].hash(body.new_password)
    async with request.app[SESSIONS]() as session:
        version = await session.scalar(update(User).where(User.id == user.id)
                                       .values(password_hash=password_hash, token_version=User.token_version + 1,
                                               updated_at=datetime.now(UTC))
                                       .returning(User.token_version))
        await session.commit()
    assert version is not None
    await store_token_version(request.app[REDIS], user_id, version)
    log.info("password changed; every session revoked", user_id=str(user_id))
    return web.Response(status=204)


async def delete_account(request: web.Request) -> web.Response:
    """Stop every run, delete the broker credentials everywhere, and anonymise the account.

    With square_off, open positions are exited first: while an exit is still
    being placed the answer is 409 (the credentials are needed for it) and the
    request is repeated once the positions are closed. The order log stays (as
    the audit trail of real orders) but names nobody.
    """
    from services.api.run_control import stop_strategy  # run_control imports modules importing this one

    user_id = current_user(request)
    body = await read_model(request, DeleteAccountRequest)
    async with request.app[READS]() as session:
        user = await _confirm_password(request, await session.get(User, user_id), body.password)
        strategy_ids = list(await session.scalars(select(Strategy.id).where(Strategy.user_id == user_id)))
    redis = request.app[REDIS]
    for strategy_id in strategy_ids:
        await stop_strategy(request.app, user_id, strategy_id, body.square_off)
    loaded = [sid for sid in strategy_ids if await redis.exists(keys.strategy_key(sid))]
    if loaded:
        raise ApiError(409, "square_off_in_progress",
                       "every strategy is stopped and open positions are being squared off; repeat the deletion "
                       "once they have exited (GET /api/v1/strategies/{id}/status)",
                       {"strategy_ids": [str(sid) for sid in loaded]})
    async with request.app[SESSIONS]() as session:
        await session.execute(BrokerCredential.__table__.delete().where(BrokerCredential.user_id == user_id))
        await session.execute(update(Strategy).where(Strategy.user_id == user_id, Strategy.deleted_at.is_(None))
                              .values(deleted_at=datetime.now(UTC)))
        version = await session.scalar(
            update(User).where(User.id == user_id)
            .values(email=f"deleted-{user_id}@deleted.invalid", name="deleted user", password_hash="!deleted",
                    token_version=User.token_version + 1, updated_at=datetime.now(UTC))
            .returning(User.token_version))
        await session.commit()
    await redis.delete(keys.broker_credentials_key(user_id))
    assert version is not None
    await store_token_version(request.app[REDIS], user_id, version)
    log.info("account deleted and anonymised", user_id=str(user.id), strategies=len(strategy_ids))
    return web.Response(status=204)
