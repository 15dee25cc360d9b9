"""Typed app keys for shared resources, and request helpers (body, path id, caller)."""

from __future__ import annotations

from typing import Any, TypeVar
from uuid import UUID

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from libs.broker.kite import KiteGateway
from libs.schema import keys
from libs.schema.tables import User
from libs.service.secretbox import SecretBox
from libs.trading.calendar import MarketCalendar
from services.api.errors import ApiError, field_error, not_found, validation_error
from services.api.security import (
    AccessClaims,
    LoginThrottle,
    Passwords,
    RegisterThrottle,
    Tokens,
    bearer_token,
    token_error,
)
from services.api.settings import ApiSettings

M = TypeVar("M", bound=BaseModel)

SETTINGS = web.AppKey("settings", ApiSettings)
ENGINE = web.AppKey("engine", AsyncEngine)
SESSIONS = web.AppKey("sessions", async_sessionmaker[AsyncSession])
# Autocommit sessions for single-statement reads: no BEGIN/ROLLBACK round trips.
READS = web.AppKey("reads", async_sessionmaker[AsyncSession])
REDIS = web.AppKey("redis", Redis)
BOX = web.AppKey("secretbox", SecretBox)
GATEWAY = web.AppKey("gateway", KiteGateway)
CALENDAR = web.AppKey("calendar", MarketCalendar)
PASSWORDS = web.AppKey("passwords", Passwords)
TOKENS = web.AppKey("tokens", Tokens)
THROTTLE = web.AppKey("throttle", LoginThrottle)
REGISTER_THROTTLE = web.AppKey("register_throttle", RegisterThrottle)

USER_ID = web.RequestKey("user_id", UUID)
CLAIMS = web.RequestKey("claims", AccessClaims)


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or (content_type.startswith("application/")
                                                   and content_type.endswith("+json"))


async def read_json(request: web.Request) -> Any:
    """Return the decoded JSON body: 413 if too large, 415 if not declared JSON, 400 if empty or not JSON."""
    if not is_json(request.content_type):
        raise ApiError(415, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)",
                       {"content_type": request.content_type[:100]})
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw.strip():
        raise ApiError(400, "bad_json", "request body must be a JSON document")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", "request body is not valid JSON", {"reason": str(exc)[:200]}) from None
    _reject_nul(data, [])
    return data


def _reject_nul(value: Any, loc: list[str | int]) -> None:
    # Postgres text cannot hold NUL; refusing it here keeps it a 422, not a 500.
    # Iterative: orjson accepts nesting deeper than Python's recursion limit.
    pending: list[tuple[Any, list[str | int]]] = [(value, loc)]
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise field_error(where, "text must not contain NUL characters", "nul_character")
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    raise field_error(where, "keys must not contain NUL characters", "nul_character")
                pending.append((child, [*where, key]))
        elif isinstance(item, list):
            pending.extend((child, [*where, index]) for index, child in enumerate(item))


async def read_model(request: web.Request, model: type[M]) -> M:
    """Return the body validated as `model`; 422 with field paths if it does not fit."""
    data = await read_json(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def path_uuid(request: web.Request, name: str = "id", what: str = "strategy") -> UUID:
    """Return a UUID path parameter; anything else names no resource: 404."""
    try:
        return UUID(request.match_info[name])
    except ValueError:
        raise not_found(what) from None


async def authenticate(request: web.Request) -> UUID:
    """Check the bearer token (signature, expiry, type, logout, token_version) and note the caller; 401 if bad.

    One Redis round trip per request (deny-list and cached version together);
    Postgres only when the version is not cached.
    """
    claims = request.app[TOKENS].claims(bearer_token(request.headers.get("Authorization")))
    redis = request.app[REDIS]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.exists(keys.revoked_token_key(claims.jti))
        pipe.get(keys.token_version_key(claims.user_id))
        revoked, cached = await pipe.execute()
    if revoked:
        raise token_error("token_revoked", "the access token was revoked (logged out); log in again")
    version = int(cached) if cached is not None else await _load_token_version(request.app, claims.user_id)
    if version != claims.version:
        raise token_error("token_revoked", "the access token was revoked (password changed or account deleted); "
                          "log in again")
    request[USER_ID], request[CLAIMS] = claims.user_id, claims
    return claims.user_id


async def _load_token_version(app: web.Application, user_id: UUID) -> int:
    async with app[READS]() as session:
        version = await session.scalar(select(User.token_version).where(User.id == user_id))
    if version is None:
        raise token_error("invalid_token", "the access token's user no longer exists")
    # NX: a version read just before a bump must not overwrite the bumped one, which
    # store_token_version writes unconditionally after the bump commits.
    await app[REDIS].set(keys.token_version_key(user_id), version, ex=keys.TOKEN_VERSION_TTL_S, nx=True)
    return version


async def store_token_version(redis: Redis, user_id: UUID, version: int) -> None:
    """Publish a bumped token_version (after its commit): older tokens stop working now."""
    await redis.set(keys.token_version_key(user_id), version, ex=keys.TOKEN_VERSION_TTL_S)


def current_user(request: web.Request) -> UUID:
    """Return the caller's user id, checked by `authenticate` before the handler ran; 401 otherwise."""
    cached = request.get(USER_ID)
    if cached is None:
        raise ApiError(401, "unauthorized", "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    return cached


def client_addr(request: web.Request) -> str:
    """Return the client address the login throttle counts against."""
    if request.app[SETTINGS].trust_forwarded_for:
        # The trusted proxy appends the address it saw: the last entry. Entries before it
        # are whatever the client sent, so taking the first let anyone pick their own
        # address and step around the per-address login throttle.
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
        if forwarded:
            return forwarded[:64]
    return request.remote or "unknown"
