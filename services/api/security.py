"""Passwords (argon2id), bearer tokens (JWT HS256), the secret box and the login throttle."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from uuid import UUID

import jwt
import structlog
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.asyncio import Redis

from libs.schema import keys
from libs.service.secretbox import SecretBox, decode_key, generate_key
from services.api.errors import ApiError
from services.api.settings import ApiSettings

log = structlog.get_logger("api")


class MissingSecretKey(RuntimeError):
    """TICKWISE_SECRET_KEY is unset outside dev mode."""


def build_secretbox(settings: ApiSettings) -> SecretBox:
    """Return the box for broker secrets; refuse to run without a key unless in dev mode."""
    if not settings.secret_key:
        if not settings.dev_mode:
            raise MissingSecretKey("TICKWISE_SECRET_KEY is required (base64 of 32 random bytes); "
                                   "set TICKWISE_DEV_MODE=true to run with an ephemeral key")
        log.warning("DEV MODE: no TICKWISE_SECRET_KEY, using an EPHEMERAL key; stored broker secrets "
                    "will NOT decrypt after a restart. Never run like this with real accounts.")
        return SecretBox.from_b64(generate_key(), settings.secret_keys_retired)
    return SecretBox.from_b64(settings.secret_key, settings.secret_keys_retired)


def jwt_secret(settings: ApiSettings, box_key_b64: str | None) -> bytes:
    """Return the JWT signing key: the configured one, else derived from the secret key."""
    if settings.jwt_secret:
        return settings.jwt_secret.encode()
    if box_key_b64:
        # A separate key per purpose: the token key never equals the encryption key.
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"tickwise-jwt-v1")
        return hkdf.derive(decode_key(box_key_b64))
    return secrets.token_bytes(32)


class Passwords:
    """Hash and verify passwords with argon2id in a small thread pool, in two lanes.

    New hashes (registration, password change) may hold at most a quarter of the
    pool's threads (one at least), and wait for them in asyncio (never in the
    pool's queue); logins have lanes of their own. So a registration flood cannot queue argon2 work in
    front of a login: the login waits for at most the hashes already running.
    Past `hash_queue_max` waiting new hashes, more are refused (503) at once.
    """

    def __init__(self, settings: ApiSettings) -> None:
        self._hasher = PasswordHasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib,
                                      parallelism=2, type=Type.ID)
        self._pool = ThreadPoolExecutor(max_workers=settings.hash_workers, thread_name_prefix="argon2")
        new_lanes = max(1, settings.hash_workers // 4)
        self._new_hashes = asyncio.Semaphore(new_lanes)
        self._logins = asyncio.Semaphore(max(1, settings.hash_workers - new_lanes))
        self._new_waiting, self._new_waiting_max = 0, settings.hash_queue_max
        # Unknown emails are verified against this, so they cost as much as known ones.
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        """Return a new hash (registration, password change); 503 when too many wait already."""
        if self._new_waiting >= self._new_waiting_max:
            raise ApiError(503, "busy", "too many passwords are being set right now; retry in a few seconds",
                           headers={"Retry-After": "5"})
        self._new_waiting += 1
        try:
            async with self._new_hashes:
                return await asyncio.get_running_loop().run_in_executor(self._pool, self._hasher.hash, password)
        finally:
            self._new_waiting -= 1

    async def rehash(self, password: str) -> str:
        """Return a hash under the current parameters, in the login lane (upgrading an old hash at login)."""
        async with self._logins:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Return whether password matches; with no stored hash, spend the same time and say no."""
        target = stored_hash or self._dummy

        def check() -> bool:
            try:
                return self._hasher.verify(target, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        async with self._logins:
            ok = await asyncio.get_running_loop().run_in_executor(self._pool, check)
        return ok and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class AccessClaims:
    """The checked claims of an access token."""

    user_id: UUID
    version: int  # the user's token_version when it was issued
    jti: str  # the token's own id, for the logout deny-list
    expires_at: int


def token_error(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class Tokens:
    """Issue and check HS256 access tokens: `sub` user id, `typ` access, `ver` token version, `jti` id."""

    ALGORITHM = "HS256"
    TYPE = "access"

    def __init__(self, secret: bytes, lifetime_s: int) -> None:
        self._secret = secret
        self.lifetime_s = lifetime_s

    def derive(self, purpose: bytes) -> bytes:
        """Return a key for another signing purpose, derived from (never equal to) the token key."""
        return hmac.new(self._secret, b"tickwise-derive:" + purpose, hashlib.sha256).digest()

    def issue(self, user_id: UUID, version: int = 0) -> str:
        now = int(time.time())
        claims = {"sub": str(user_id), "iat": now, "exp": now + self.lifetime_s, "typ": self.TYPE,
                  "ver": version, "jti": secrets.token_urlsafe(12)}
        return jwt.encode(claims, self._secret, algorithm=self.ALGORITHM)

    def claims(self, token: str) -> AccessClaims:
        """Return the claims of a valid access token; raise ApiError 401 otherwise."""
        try:
            claims = jwt.decode(token, self._secret, algorithms=[self.ALGORITHM],
                                options={"require": ["exp", "sub", "iat"]})
            # Another kind of token signed with the same key (a future refresh or reset
            # token) must never pass as an access token.
            if claims.get("typ") != self.TYPE or type(claims.get("ver")) is not int \
                    or not isinstance(claims.get("jti"), str):
                raise ValueError("not an access token")
            return AccessClaims(UUID(str(claims["sub"])), claims["ver"], claims["jti"][:64], int(claims["exp"]))
        except jwt.ExpiredSignatureError:
            raise token_error("token_expired", "the access token has expired; log in again") from None
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise token_error("invalid_token", "the access token is invalid") from None

    def user_id(self, token: str) -> UUID:
        """Return the user id of a valid token (signature, expiry and type; not revocation)."""
        return self.claims(token).user_id



def bearer_token(header: str | None) -> str:
    """Return the token of an `Authorization: Bearer` header; raise 401 if absent."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def email_digest(email: str) -> str:
    """Return a digest naming an email in Redis without storing the address."""
    return hashlib.sha256(b"tickwise-login:" + email.lower().encode()).hexdigest()[:32]


class LoginThrottle:
    """Count failed logins per (email, address) pair, per address and per email in Redis (fixed windows).

    Guessing from one address is slowed by the pair and address counters
    (`max_failures` per `window_s`); the per-email counter is only a much higher
    ceiling over a longer window (`email_max_failures` per `email_window_s`), so a
    third party cannot lock the owner out with a handful of bad guesses: the
    owner logs in from another address, with a pair counter of their own.

    Each attempt is counted (INCR, atomically with the window's EXPIRE) before
    the password is checked and given back on success or refusal: checking
    first and counting after let a burst of parallel guesses all pass the check.
    """

    def __init__(self, redis: Redis, max_failures: int, window_s: int, email_max_failures: int = 50,
                 email_window_s: int = 900) -> None:
        self.redis, self.max_failures, self.window_s = redis, max_failures, window_s
        self.email_max_failures, self.email_window_s = email_max_failures, email_window_s

    def _limits(self, email: str, addr: str) -> list[tuple[str, int, int]]:
        digest = email_digest(email)
        return [(keys.login_throttle_pair_key(digest, addr), self.max_failures, self.window_s),
                (keys.login_throttle_addr_key(addr), self.max_failures, self.window_s),
                (keys.login_throttle_email_key(digest), self.email_max_failures, self.email_window_s)]

    async def reserve(self, email: str, addr: str) -> None:
        """Count this attempt against every counter; raise 429 (and give it back) past a limit."""
        limits = self._limits(email, addr)
        async with self.redis.pipeline(transaction=True) as pipe:
            for key, _limit, window in limits:
                pipe.incr(key)
                pipe.expire(key, window, nx=True)
            counts = (await pipe.execute())[0::2]
        over = [key for (key, limit, _w), count in zip(limits, counts, strict=True) if count > limit]
        if not over:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            for key, _limit, _window in limits:
                pipe.decr(key)
            for key in over:
                pipe.ttl(key)
            ttls = [t for t in (await pipe.execute())[len(limits):] if t > 0]
        retry = max(ttls) if ttls else self.window_s
        raise ApiError(429, "too_many_login_attempts",
                       f"too many failed logins; retry in {retry} s", {"retry_after_s": retry},
                       headers={"Retry-After": str(retry)})

    async def succeeded(self, email: str, addr: str) -> None:
        """Reset the account's counters and give the address back the attempt it reserved."""
        pair_key, addr_key, email_key = (key for key, _l, _w in self._limits(email, addr))
        await self.redis.delete(pair_key, email_key)
        if await self.redis.decr(addr_key) <= 0:
            await self.redis.delete(addr_key)


class RegisterThrottle:
    """Count registrations per client address (fixed window): each one costs an argon2 hash."""

    def __init__(self, redis: Redis, max_per_window: int, window_s: int) -> None:
        self.redis, self.max_per_window, self.window_s = redis, max_per_window, window_s

    async def count(self, addr: str) -> None:
        """Count one registration; 429 past the limit."""
        key = keys.register_throttle_addr_key(addr)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, self.window_s, nx=True)
            pipe.ttl(key)
            count, _, ttl = await pipe.execute()
        if count > self.max_per_window:
            retry = ttl if ttl > 0 else self.window_s
            raise ApiError(429, "too_many_registrations", f"too many registrations from this address; retry in "
                           f"{retry} s", {"retry_after_s": retry}, headers={"Retry-After": str(retry)})
