"""Decrypt a user's Kite credentials from `broker:{user_id}` for the order path.

The hash holds the AES-GCM ciphertexts the API copied from Postgres, so the
order path never touches Postgres. Plaintext is cached in memory, keyed by the
ciphertexts themselves: a reconnect with a new token is seen at the next
order, while the common case skips the decrypt. Every plaintext is registered
with the log redactor before it can reach a log line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from libs.broker.kite import api_key_fingerprint
from libs.schema import keys
from libs.service.logging import register_secret
from libs.service.redis_client import as_text
from libs.service.secretbox import SecretBox, SecretBoxError


class CredentialsUnavailable(Exception):
    """The user's broker credentials are missing or do not decrypt."""


@dataclass(frozen=True)
class KiteCredentials:
    """Plaintext credentials of one Kite account; repr hides the secrets."""

    api_key: str = field(repr=False)
    access_token: str = field(repr=False)
    api_key_fp: str
    token_ct: bytes = field(default=b"", repr=False)  # the ciphertext it came from (to record a refusal)


class CredentialStore:
    """Read and decrypt `broker:{user_id}`, with a short in-memory cache."""

    def __init__(self, redis: Redis, box: SecretBox, *, ttl_s: float, max_entries: int = 50_000) -> None:
        self._redis, self._box, self._ttl_s, self._max = redis, box, ttl_s, max_entries
        self._cache: dict[tuple[str, bytes, bytes], tuple[float, KiteCredentials]] = {}
        self._fps: dict[str, str] = {}  # user_id -> api_key_fp last seen (a hint, never a credential)

    def fingerprint_hint(self, user_id: str) -> str | None:
        """Return the api_key fingerprint last seen for the user, if any (may be stale: a hint)."""
        return self._fps.get(user_id)

    async def get(self, user_id: str, fields: dict[bytes, bytes] | None = None) -> KiteCredentials:
        """Return the user's credentials; raise CredentialsUnavailable if there are none.

        `fields`: the `broker:{user_id}` hash when the caller already read it (under
        the strategy lock, in the same round trip); otherwise it is read here.
        """
        if fields is None:
            fields = await self._redis.hgetall(keys.broker_credentials_key(user_id))
        api_key_ct, token_ct = fields.get(b"api_key"), fields.get(b"access_token")
        if not api_key_ct or not token_ct:
            raise CredentialsUnavailable("no broker credentials or access token in Redis for this user")
        ident = (user_id, api_key_ct, token_ct)
        now = time.monotonic()
        hit = self._cache.get(ident)
        if hit is not None and hit[0] > now:
            self._fps[user_id] = hit[1].api_key_fp
            return hit[1]
        try:
            api_key = self._box.decrypt(api_key_ct.decode(), f"broker_credentials:{user_id}:api_key")
            token = self._box.decrypt(token_ct.decode(), f"broker_credentials:{user_id}:access_token")
        except (SecretBoxError, UnicodeDecodeError) as exc:
            raise CredentialsUnavailable(f"broker credentials do not decrypt: {type(exc).__name__}") from exc
        api_key, token = as_text(api_key), as_text(token)
        register_secret(api_key)
        register_secret(token)
        fp = fields.get(b"api_key_fp")
        creds = KiteCredentials(api_key, token, fp.decode() if fp else api_key_fingerprint(api_key), token_ct)
        if len(self._cache) >= self._max:
            self._cache.clear()
            self._fps.clear()
        self._cache[ident] = (now + self._ttl_s, creds)
        self._fps[user_id] = creds.api_key_fp
        return creds
