"""Accounts: register, log in (throttled, constant-ish time), and read the caller."""

from __future__ import annotations

import structlog
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from libs.schema.models import LoginRequest, RegisterRequest, TokenOut, UserOut
from libs.schema.tables import User
from services.api.deps import (
    PASSWORDS,
    READS,
    SESSIONS,
    THROTTLE,
    TOKENS,
    client_addr,
    current_user,
    read_model,
)
from services.api.errors import ApiError, json_response

log = structlog.get_logger("api")


def _user_out(user: User) -> dict:
    return UserOut.model_validate(user).model_dump(mode="json")


async def register(request: web.Request) -> web.Response:
    """Create an account; 409 if the email is taken."""
    body = await read_model(request, RegisterRequest)
    password_hash = await request.app[PASSWORDS].hash(body.password)
    user = User(email=body.email, name=body.name, password_hash=password_hash)
    async with request.app[SESSIONS]() as session:
        session.add(user)
        try:
            await session.commit()
        except IntegrityError:
            raise ApiError(409, "email_taken", "an account with this email already exists") from None
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
            user.password_hash = await passwords.hash(body.password)
            await session.commit()
    await throttle.succeeded(body.email, addr)
    tokens = request.app[TOKENS]
    out = TokenOut(access_token=tokens.issue(user.id), expires_in=tokens.lifetime_s)
    log.info("user logged in", user_id=str(user.id))
    return json_response(out.model_dump(mode="json"))


async def me(request: web.Request) -> web.Response:
    """Return the caller."""
    user_id = current_user(request)
    async with request.app[READS]() as session:
        user = await session.get(User, user_id)
    if user is None:
        raise ApiError(401, "invalid_token", "the access token's user no longer exists")
    return json_response(_user_out(user))
