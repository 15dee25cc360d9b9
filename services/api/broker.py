"""Broker credentials: connect, daily session, status; encrypted at rest, rotated on read.

api_key, api_secret and access_token are stored as AES-256-GCM ciphertexts
bound to their row and column. Whenever they are read with a retired key, they
are re-encrypted under the current one (and the `key_id` column follows). The
order path reads the `broker:{user_id}` hash instead of Postgres; every write
here mirrors the ciphertexts there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog
from aiohttp import web
from redis.asyncio import Redis
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.broker.kite import BrokerError, BrokerErrorKind, api_key_fingerprint
from libs.schema import keys
from libs.schema.models import (
    BrokerConnectOut,
    BrokerConnectRequest,
    BrokerSessionRequest,
    BrokerStatusOut,
    StrategyStatus,
)
from libs.schema.tables import BrokerCredential, Strategy
from libs.service.logging import register_secret, scrub
from libs.service.secretbox import SecretBox, SecretBoxError
from libs.trading.tokens import token_expires_at
from services.api.deps import BOX, GATEWAY, READS, REDIS, SESSIONS, current_user, read_model
from services.api.errors import ApiError, field_error, json_response
from services.api.notify import token_expired

log = structlog.get_logger("api")

COLUMNS = ("api_key", "api_secret", "access_token")
# Kite credentials are printable ASCII; anything else could not even travel in an HTTP header.
_PRINTABLE_ASCII = re.compile(r"^[\x21-\x7e]+$")


def aad(user_id: UUID, column: str) -> str:
    return f"broker_credentials:{user_id}:{column}"


def api_key_hint(api_key: str) -> str:
    """Return the last characters of a key, only when that is a small part of it."""
    return "****" + api_key[-4:] if len(api_key) >= 12 else "****"


@dataclass(frozen=True)
class Credentials:
    """Decrypted broker credentials of one user; secrets kept out of repr."""

    user_id: UUID
    api_key: str = field(repr=False)
    api_secret: str = field(repr=False)
    access_token: str | None = field(repr=False)
    api_key_fp: str
    is_valid: bool


def check_printable(**values: str) -> None:
    for name, value in values.items():
        if not _PRINTABLE_ASCII.fullmatch(value):
            raise field_error([name], "must be printable ASCII without spaces", "broker_token_format")


def broker_unavailable(exc: BrokerError) -> ApiError:
    return ApiError(503, "broker_unavailable", "the broker did not answer; retry shortly",
                    {"broker_error": exc.error_type})


async def write_broker_hash(redis: Redis, row: BrokerCredential) -> None:
    """Mirror a credentials row into `broker:{user_id}` for the order path (ciphertexts only)."""
    key = keys.broker_credentials_key(row.user_id)
    fields = {"api_key": row.api_key, "api_key_fp": row.api_key_fp, "is_valid": "1" if row.is_valid else "0",
              "token_state": row.token_state}
    if row.access_token:
        fields["access_token"] = row.access_token
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.hset(key, mapping=fields)
        await pipe.execute()


async def load_credentials(app: web.Application, session: AsyncSession, user_id: UUID) -> Credentials | None:
    """Return the user's decrypted credentials (re-encrypting under the current key if needed)."""
    box: SecretBox = app[BOX]
    row = await session.get(BrokerCredential, user_id, with_for_update=False, populate_existing=True)
    if row is None:
        return None
    try:
        plain = {c: box.decrypt(getattr(row, c), aad(user_id, c)) if getattr(row, c) else None for c in COLUMNS}
    except SecretBoxError as exc:
        log.error("broker credentials do not decrypt", user_id=str(user_id), error=str(exc))
        raise ApiError(409, "broker_credentials_unreadable",
                       "the stored broker credentials cannot be read; connect the broker again") from None
    for value in plain.values():
        register_secret(value)
    stale = [c for c in COLUMNS if getattr(row, c) and box.needs_rotation(getattr(row, c))]
    if stale or row.key_id != box.current_key_id:
        for column in COLUMNS:
            if plain[column] is not None:
                setattr(row, column, box.encrypt(plain[column], aad(user_id, column)))
        row.key_id = box.current_key_id
        await session.commit()
        await write_broker_hash(app[REDIS], row)
        log.info("broker credentials re-encrypted", user_id=str(user_id), key_id=row.key_id)
    return Credentials(user_id=user_id, api_key=plain["api_key"] or "", api_secret=plain["api_secret"] or "",
                       access_token=plain["access_token"], api_key_fp=row.api_key_fp, is_valid=row.is_valid)


def require_valid(creds: Credentials | None) -> Credentials:
    """Return credentials that can trade; 409 telling the user what to do otherwise."""
    if creds is None:
        raise ApiError(409, "broker_not_connected",
                       "connect your broker first: POST /api/v1/broker/connect")
    if not creds.is_valid or not creds.access_token:
        raise credentials_invalid()
    return creds


def credentials_invalid() -> ApiError:
    return ApiError(409, "broker_credentials_invalid",
                    "your broker credentials are not valid; refresh the session (POST /api/v1/broker/session) "
                    "or connect again (POST /api/v1/broker/connect)")


async def mark_invalid(app: web.Application, user_id: UUID) -> None:
    """Record that the broker refused the stored token (e.g. expired at 06:00)."""
    async with app[SESSIONS]() as session:
        await session.execute(update(BrokerCredential).where(BrokerCredential.user_id == user_id)
                              .values(is_valid=False))
        await session.commit()
        row = await session.get(BrokerCredential, user_id)
        if row is not None:
            await write_broker_hash(app[REDIS], row)
    log.info("broker credentials marked invalid", user_id=str(user_id))
    await token_expired(app[REDIS], user_id)


def token_fields(is_valid: bool) -> dict[str, Any]:
    """Return the token-state columns of credentials the broker just answered about."""
    now = datetime.now(UTC)
    return {"token_state": "valid" if is_valid else "expired", "token_checked_at": now,
            "token_issued_at": now if is_valid else None}


def token_status(row: BrokerCredential) -> dict[str, Any]:
    """Return the token-state fields of `GET /broker` (state, last checked, 06:00 IST expiry)."""
    return {"token_state": row.token_state, "token_checked_at": row.token_checked_at,
            "token_expires_at": token_expires_at(row.token_issued_at) if row.token_state == "valid" else None}


async def _store(app: web.Application, user_id: UUID, *, api_key: str, api_secret: str, access_token: str,
                 is_valid: bool, profile: dict[str, Any] | None, replace: bool = True) -> BrokerCredential:
    """Upsert the credentials row and mirror it to Redis; with replace=False only insert a missing row."""
    box: SecretBox = app[BOX]
    values = {c: box.encrypt(v, aad(user_id, c)) for c, v in
              (("api_key", api_key), ("api_secret", api_secret), ("access_token", access_token))}
    values |= {"is_valid": is_valid, "key_id": box.current_key_id, "api_key_hint": api_key_hint(api_key),
               "api_key_fp": api_key_fingerprint(api_key), **token_fields(is_valid)}
    if profile is not None:
        values |= {"broker_user_id": str(profile.get("user_id") or "")[:64] or None,
                   "broker_user_name": str(profile.get("user_name") or "")[:200] or None}
    stmt = insert(BrokerCredential).values(user_id=user_id, **values)
    if replace:
        stmt = stmt.on_conflict_do_update(index_elements=[BrokerCredential.user_id],
                                          set_={**values, "updated_at": func.now()})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=[BrokerCredential.user_id])
    async with app[SESSIONS]() as session:
        try:
            await session.execute(stmt)
            await session.commit()
        except IntegrityError:
            raise ApiError(401, "invalid_token", "the access token's user no longer exists") from None
        row = await session.get(BrokerCredential, user_id)
    assert row is not None
    await write_broker_hash(app[REDIS], row)
    return row


async def _refuse_account_switch_while_trading(app: web.Application, user_id: UUID, new_fp: str) -> None:
    """409 if a different Kite account would replace the one running strategies trade in.

    The order path reads `broker:{user_id}`: switching it mid-run would send the
    exit of a position held in the old account to the new one (a short sale
    there, the real position left open) and look its tags up in the wrong book.
    """
    async with app[READS]() as session:
        current_fp = await session.scalar(select(BrokerCredential.api_key_fp)
                                          .where(BrokerCredential.user_id == user_id))
        if current_fp is None or current_fp == new_fp:
            return
        rows = (await session.execute(select(Strategy.id, Strategy.status)
                                      .where(Strategy.user_id == user_id))).all()
    busy = any(status == StrategyStatus.running for _, status in rows)
    if not busy and rows:
        # A stopped strategy squaring off keeps its run loaded until the exit fills.
        busy = bool(await app[REDIS].exists(*(keys.strategy_key(sid) for sid, _ in rows)))
    if busy:
        raise ApiError(409, "broker_account_in_use",
                       "strategies are running on the connected Kite account; stop them (and let any "
                       "square-off finish) before connecting a different account")


async def connect(request: web.Request) -> web.Response:
    """Store credentials after checking them with the broker's profile call."""
    user_id = current_user(request)
    body = await read_model(request, BrokerConnectRequest)
    api_key = body.api_key
    api_secret, access_token = body.api_secret.get_secret_value(), body.access_token.get_secret_value()
    for value in (api_key, api_secret, access_token):
        register_secret(value)
    check_printable(api_key=api_key, api_secret=api_secret, access_token=access_token)
    await _refuse_account_switch_while_trading(request.app, user_id, api_key_fingerprint(api_key))
    profile: dict[str, Any] | None = None
    reason: BrokerError | None = None
    try:
        profile = await request.app[GATEWAY].profile(api_key, access_token)
    except BrokerError as exc:
        if exc.kind not in (BrokerErrorKind.AUTH, BrokerErrorKind.FINAL):
            raise broker_unavailable(exc) from None
        reason = exc
    # Rejected credentials never replace stored ones (a typo must not strand an open position
    # whose exit needs the working token); with nothing stored they are kept, marked invalid,
    # so that the daily login (POST /broker/session) can complete them.
    row = await _store(request.app, user_id, api_key=api_key, api_secret=api_secret, access_token=access_token,
                       is_valid=reason is None, profile=profile, replace=reason is None)
    log.info("broker connected", user_id=str(user_id), is_valid=row.is_valid, api_key_fp=row.api_key_fp)
    if reason is not None:
        raise ApiError(422, "broker_credentials_invalid",
                       f"the broker rejected the credentials: {scrub(reason.message)}; "
                       "the stored credentials (if any) are unchanged",
                       {"broker_error": reason.error_type, "is_valid": row.is_valid, "stored_unchanged": True,
                        "api_key_hint": row.api_key_hint})
    out = BrokerConnectOut(is_valid=True, api_key_hint=row.api_key_hint, user_name=row.broker_user_name)
    return json_response(out.model_dump(mode="json"))


async def new_session(request: web.Request) -> web.Response:
    """Exchange a Kite request_token for today's access token, with the stored api_secret."""
    user_id = current_user(request)
    body = await read_model(request, BrokerSessionRequest)
    register_secret(body.request_token)
    check_printable(request_token=body.request_token)
    async with request.app[SESSIONS]() as session:
        creds = await load_credentials(request.app, session, user_id)
    if creds is None:
        raise ApiError(409, "broker_not_connected", "connect your broker first: POST /api/v1/broker/connect")
    try:
        data = await request.app[GATEWAY].generate_session(creds.api_key, body.request_token, creds.api_secret)
    except BrokerError as exc:
        if exc.kind not in (BrokerErrorKind.AUTH, BrokerErrorKind.FINAL):
            raise broker_unavailable(exc) from None
        raise ApiError(422, "broker_session_rejected",
                       f"the broker rejected the request token: {scrub(exc.message)}",
                       {"broker_error": exc.error_type}) from None
    access_token = str(data.get("access_token") or "")
    register_secret(access_token)
    if not access_token:
        raise ApiError(503, "broker_unavailable", "the broker returned no access token; retry")
    row = await _store(request.app, user_id, api_key=creds.api_key, api_secret=creds.api_secret,
                       access_token=access_token, is_valid=True, profile=data)
    log.info("broker session refreshed", user_id=str(user_id), api_key_fp=row.api_key_fp)
    out = BrokerConnectOut(is_valid=True, api_key_hint=row.api_key_hint, user_name=row.broker_user_name)
    return json_response(out.model_dump(mode="json"))


async def status(request: web.Request) -> web.Response:
    """Say whether credentials are stored and valid; never a secret."""
    user_id = current_user(request)
    async with request.app[READS]() as session:
        row = await session.get(BrokerCredential, user_id)
    return json_response(await broker_status(request.app, user_id, row))


async def broker_status(app: web.Application, user_id: UUID, row: BrokerCredential | None) -> dict:
    """Return the broker status of a credentials row (also pushed by the dashboard's event stream)."""
    if row is None:
        return BrokerStatusOut(connected=False, is_valid=False).model_dump(mode="json")
    token = token_status(row)
    # The executor records a token the broker refused at order time in Redis only (it never
    # writes Postgres): that answer is newer than a `valid` one here, for the same token.
    seen = await app[REDIS].hmget(keys.broker_credentials_key(user_id), "access_token", "token_state")
    refused = seen[1] == b"expired" and seen[0] is not None and seen[0].decode() == row.access_token
    if refused:
        token |= {"token_state": "expired", "token_expires_at": None}
    out = BrokerStatusOut(connected=True, is_valid=row.is_valid and not refused,
                          api_key_hint=row.api_key_hint, updated_at=row.updated_at, **token)
    return out.model_dump(mode="json")
