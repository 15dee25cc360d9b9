"""The Kite access token's daily life: ask the broker, keep its last answer everywhere.

Kite kills every access token at 06:00 IST the morning after it was issued. The
check is the broker's profile call: an answer means `valid`, a TokenException
`expired`, anything else (timeout, 5xx) `unknown`, which leaves the stored
validity as it was. The answer lands in Postgres (`token_state`,
`token_checked_at`, `is_valid`) and in `broker:{user_id}` (`token_state`,
`is_valid`), each only while the stored token is still the one that was
checked, so a slow answer about an old token never overwrites a fresh login.
Used by the API (start, with a short cache) and the scheduler (pre-open check).
A `broker:{user_id}` lost with Redis is restored from Postgres only while it is
still missing (the scheduler's rebuild, the executor's reconciliation).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from uuid import UUID

from redis.asyncio import Redis
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.broker.kite import BrokerError, BrokerErrorKind, KiteGateway
from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.tables import BrokerCredential
from libs.service.clock import Clock, SystemClock
from libs.service.logging import get_logger, register_secret
from libs.service.scripts import script_for
from libs.service.secretbox import SecretBox, SecretBoxError
from libs.trading.calendar import IST

KITE_TOKEN_EXPIRY = time(6, 0)  # IST: Kite expires every access token at this time each morning
SESSION_EXPIRED_REASON = "Kite session expired: log in again"

log = get_logger("tokens")

# Write the answer only while the hash still holds the checked token (a login may have replaced it).
_MIRROR = """
-- KEYS: [1] broker:{user_id} (hash)
-- ARGV: [1] the checked access_token (ciphertext), [2] token_state, [3] is_valid '1'|'0', or '' to keep it
-- Returns: 1 if written, 0 if the hash holds another token or none (replaced or lost: nothing written)
if redis.call('HGET', KEYS[1], 'access_token') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'token_state', ARGV[2])
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'is_valid', ARGV[3]) end
  return 1
end
return 0
"""

# Never over a hash that exists: a login since the Postgres read may have written a newer token.
_RESTORE_BROKER = """
-- KEYS: [1] broker:{user_id} (hash)
-- ARGV: [1] the hash's fields (JSON flat list: field, value, ...)
-- Returns: 1 if restored, 0 if the hash existed (left as it is)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(cjson.decode(ARGV[1])))
return 1
"""


async def restore_broker_hash(redis: Redis, user_id: UUID | str, *, api_key: str, api_key_fp: str, is_valid: bool,
                              access_token: str | None) -> bool:
    """Write `broker:{user_id}` from its Postgres row (ciphertexts) if Redis lost it; return True if it did."""
    fields = {"api_key": api_key, "api_key_fp": api_key_fp, "is_valid": "1" if is_valid else "0"}
    if access_token:
        fields["access_token"] = access_token
    flat = [x for pair in fields.items() for x in pair]
    return bool(await script_for(redis, _RESTORE_BROKER)(keys=[keys.broker_credentials_key(user_id)],
                                                         args=[dumps(flat)]))


async def mirror_expired(redis: Redis, user_id: UUID | str, token_ct: bytes | str) -> bool:
    """Record in `broker:{user_id}` that the broker refused this token (ciphertext), unless replaced since."""
    return bool(await script_for(redis, _MIRROR)(keys=[keys.broker_credentials_key(user_id)],
                                                 args=[token_ct, TokenState.expired.value, "0"]))


class TokenState(enum.StrEnum):
    valid = "valid"
    expired = "expired"
    unknown = "unknown"


def token_expires_at(issued_at: datetime | None) -> datetime | None:
    """Return the first 06:00 IST after `issued_at` (when Kite kills the token)."""
    if issued_at is None:
        return None
    local = issued_at.astimezone(IST)
    expiry = datetime.combine(local.date(), KITE_TOKEN_EXPIRY, IST)
    if local >= expiry:
        expiry += timedelta(days=1)
    return expiry.astimezone(UTC)


@dataclass(frozen=True)
class TokenCheck:
    """The broker's answer about one user's token."""

    state: TokenState
    checked_at: datetime
    message: str | None = None
    cached: bool = False


class TokenChecker:
    """Ask the broker whether a user's stored token works and record the answer."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], redis: Redis, box: SecretBox,
                 gateway: KiteGateway, clock: Clock | None = None) -> None:
        self.sessions, self.redis, self.box, self.gateway = sessions, redis, box, gateway
        self.clock = clock or SystemClock()

    async def check(self, user_id: UUID, *, max_age_s: float = 0.0) -> TokenCheck | None:
        """Return the token's state (None without a stored token); reuse a `valid` answer younger than max_age_s."""
        async with self.sessions() as session:
            row = await session.get(BrokerCredential, user_id, populate_existing=True)
        if row is None or not row.access_token:
            return None
        now = self.clock.now()
        if (max_age_s > 0 and row.token_state == TokenState.valid and row.token_checked_at is not None
                and row.is_valid and (now - row.token_checked_at).total_seconds() < max_age_s
                and await self.redis.hget(keys.broker_credentials_key(user_id), "token_state") != b"expired"):
            # (An executor that saw the broker refuse the token since wrote `expired` in Redis: ask again.)
            return TokenCheck(TokenState.valid, row.token_checked_at, cached=True)
        try:
            api_key = self.box.decrypt(row.api_key, f"broker_credentials:{user_id}:api_key")
            token = self.box.decrypt(row.access_token, f"broker_credentials:{user_id}:access_token")
        except SecretBoxError:
            return TokenCheck(TokenState.unknown, now, "stored credentials do not decrypt")
        register_secret(api_key)
        register_secret(token)
        try:
            await self.gateway.profile(api_key, token)
            state, message = TokenState.valid, None
        except BrokerError as exc:
            state = TokenState.expired if exc.kind == BrokerErrorKind.AUTH else TokenState.unknown
            message = exc.message
        await self.record(user_id, row.access_token, state, now)
        log.info("broker token checked", user_id=str(user_id), token_state=state.value)
        return TokenCheck(state, now, message)

    async def record(self, user_id: UUID, token_ct: str, state: TokenState, checked_at: datetime) -> bool:
        """Store the answer about the token whose ciphertext is `token_ct`; False if it was replaced meanwhile."""
        values: dict[str, object] = {"token_state": state.value, "token_checked_at": checked_at}
        if state != TokenState.unknown:
            values["is_valid"] = state == TokenState.valid
        async with self.sessions() as session:
            result = await session.execute(
                update(BrokerCredential)
                .where(BrokerCredential.user_id == user_id, BrokerCredential.access_token == token_ct)
                .values(**values))
            await session.commit()
        if not result.rowcount:
            return False
        is_valid = "" if state == TokenState.unknown else ("1" if state == TokenState.valid else "0")
        await script_for(self.redis, _MIRROR)(keys=[keys.broker_credentials_key(user_id)],
                                              args=[token_ct, state.value, is_valid])
        return True
