"""Passwords (argon2id), bearer tokens (JWT HS256), the secret box and the login throttle."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
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
    """Hash and verify passwords with argon2id in a small thread pool."""

    def __init__(self, settings: ApiSettings) -> None:
        self._hasher = PasswordHasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib,
                                      parallelism=2, type=Type.ID)
        self._pool = ThreadPoolExecutor(max_workers=settings.hash_workers, thread_name_prefix="argon2")
        # Unknown emails are verified against this, so they cost as much as known ones.
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Return whether password matches; with no stored hash, spend the same time and say no."""
        target = stored_hash or self._dummy

        def check() -> bool:
            try:
                return self._hasher.verify(target, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        ok = await asyncio.get_running_loop().run_in_executor(self._pool, check)
        return ok and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Tokens:
    """Issue and check HS256 bearer tokens whose `sub` is the user id."""

    ALGORITHM = "HS256"

    def __init__(self, secret: bytes, lifetime_s: int) -> None:
        self._secret = secret
        self.lifetime_s = lifetime_s

    def derive(self, purpose: bytes) -> bytes:
        """Return a key for another signing purpose, derived from (never equal to) the token key."""
        return hmac.new(self._secret, b"tickwise-derive:" + purpose, hashlib.sha256).digest()

    def issue(self, user_id: UUID) -> str:
        now = int(time.time())
        claims = {"sub": str(user_id), "iat": now, "exp": now + self.lifetime_s, "typ": "access"}
        return jwt.encode(claims, self._secret, algorithm=self.ALGORITHM)

    def user_id(self, token: str) -> UUID:
        """Return the user id of a valid token; raise ApiError 401 otherwise."""
        try:
            claims = jwt.decode(token, self._secret, algorithms=[self.ALGORITHM],
                                options={"require": ["exp", "sub", "iat"]})
            return UUID(str(claims["sub"]))
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "token_expired", "the access token has expired; log in again",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise ApiError(401, "invalid_token", "the access token is invalid",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None


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
    """Count failed logins per email and per client address in Redis (fixed window).

    Each attempt is counted (INCR, atomically with the window's EXPIRE) before
    the password is checked and given back on success or refusal: checking
    first and counting after let a burst of parallel guesses all pass the check.
    """

    def __init__(self, redis: Redis, max_failures: int, window_s: int) -> None:
        self.redis, self.max_failures, self.window_s = redis, max_failures, window_s

    def _keys(self, email: str, addr: str) -> tuple[str, str]:
        return keys.login_throttle_email_key(email_digest(email)), keys.login_throttle_addr_key(addr)

    async def reserve(self, email: str, addr: str) -> None:
        """Count this attempt against both counters; raise 429 (and give it back) past the limit."""
        email_key, addr_key = self._keys(email, addr)
        async with self.redis.pipeline(transaction=True) as pipe:
            for key in (email_key, addr_key):
                pipe.incr(key)
                pipe.expire(key, self.window_s, nx=True)
            counts = (await pipe.execute())[0::2]
        if all(count <= self.max_failures for count in counts):
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.decr(email_key)
            pipe.decr(addr_key)
            pipe.ttl(email_key)
            pipe.ttl(addr_key)
            ttls = [t for t in (await pipe.execute())[2:] if t > 0]
        retry = max(ttls) if ttls else self.window_s
        raise ApiError(429, "too_many_login_attempts",
                       f"too many failed logins; retry in {retry} s", {"retry_after_s": retry},
                       headers={"Retry-After": str(retry)})

    async def succeeded(self, email: str, addr: str) -> None:
        """Reset the email's counter and give the address back the attempt it reserved."""
        email_key, addr_key = self._keys(email, addr)
        await self.redis.delete(email_key)
        if await self.redis.decr(addr_key) <= 0:
            await self.redis.delete(addr_key)
