"""The broker's NSE instrument list, cached per trading day in Redis.

`instruments:NSE:{day}` maps symbol -> instrument_token. It is written whole
in one MULTI, so its existence means "the complete list of that day": a symbol
missing from an existing hash is unknown, not merely not cached yet.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import UUID

import structlog
from aiohttp import web

from libs.broker.kite import BrokerError, BrokerErrorKind
from libs.schema import keys
from services.api.broker import (
    broker_unavailable,
    credentials_invalid,
    load_credentials,
    mark_invalid,
    require_valid,
)
from services.api.deps import CALENDAR, GATEWAY, REDIS, SESSIONS, SETTINGS
from services.api.errors import ApiError, field_error

log = structlog.get_logger("api")

EXCHANGE = "NSE"
INSTRUMENTS_LOCK = web.AppKey("instruments_lock", asyncio.Lock)


def unknown_symbol(symbol: str, loc: list[str | int]) -> ApiError:
    return field_error(loc, f"{symbol} is not in the broker's {EXCHANGE} instrument list", "unknown_symbol",
                       code="unknown_symbol")


async def instrument_token(app: web.Application, user_id: UUID, symbol: str,
                           loc: list[str | int] | None = None) -> int:
    """Return the instrument token of an NSE symbol; 422 if the broker does not list it.

    A missing cache is filled with the caller's own broker credentials, so a
    user without valid credentials gets 409 (connect the broker first).
    """
    loc = loc or ["symbol"]
    redis = app[REDIS]
    key = keys.instruments_key(EXCHANGE, app[CALENDAR].trading_day_of(datetime.now(UTC)))
    token = await redis.hget(key, symbol)
    if token is None:
        if not await redis.exists(key):
            await _fill(app, user_id, key)
        token = await redis.hget(key, symbol)
        if token is None:
            raise unknown_symbol(symbol, loc)
    return int(token)


async def _fill(app: web.Application, user_id: UUID, key: str) -> None:
    async with app[SESSIONS]() as session:
        creds = require_valid(await load_credentials(app, session, user_id))
    redis = app[REDIS]
    # One fetch per process at a time: the list is the same for every user.
    async with app[INSTRUMENTS_LOCK]:
        if await redis.exists(key):
            return
        try:
            rows = await app[GATEWAY].instruments(creds.api_key, creds.access_token or "", EXCHANGE)
        except BrokerError as exc:
            if exc.kind == BrokerErrorKind.AUTH:
                await mark_invalid(app, user_id)
                raise credentials_invalid() from None
            raise broker_unavailable(exc) from None
        mapping = {str(row["tradingsymbol"]).upper(): str(row["instrument_token"]) for row in rows
                   if row.get("segment", EXCHANGE) == EXCHANGE and row.get("tradingsymbol")
                   and row.get("instrument_token") is not None}
        if not mapping:
            raise ApiError(503, "broker_unavailable", "the broker returned an empty instrument list; retry")
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, app[SETTINGS].instruments_ttl_s)
            await pipe.execute()
        log.info("instruments cached", key=key, count=len(mapping))

