"""AES-256-GCM encryption of broker secrets at rest, with key ids for rotation.

Ciphertext format: ``v1.<key_id>.<base64url(nonce || ciphertext+tag)>``. A fresh
96-bit random nonce per value. The associated data binds a ciphertext to its row
and column (e.g. ``broker_credentials:<user_id>:api_secret``), so a ciphertext
copied into another user's row does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = "v1"


class SecretBoxError(Exception):
    """A key is malformed or a ciphertext does not decrypt."""


def key_id_of(key: bytes) -> str:
    """Return the public id of a key: a short digest, never the key."""
    return hashlib.sha256(b"tickwise-key-id:" + key).hexdigest()[:12]


def decode_key(b64: str) -> bytes:
    """Decode a base64 (standard or url-safe) 32-byte key."""
    try:
        raw = base64.b64decode(b64.strip() + "==", altchars=b"-_" if ("-" in b64 or "_" in b64) else None)
    except (binascii.Error, ValueError) as exc:
        raise SecretBoxError("secret key is not valid base64") from exc
    if len(raw) != 32:
        raise SecretBoxError(f"secret key must be 32 bytes, got {len(raw)}")
    return raw


def generate_key() -> str:
    """Return a new random key, base64-encoded (for TICKWISE_SECRET_KEY)."""
    return base64.b64encode(os.urandom(32)).decode()


class SecretBox:
    """Encrypt with the current key; decrypt with the current or any retired key."""

    def __init__(self, current_key: bytes, retired_keys: list[bytes] | tuple[bytes, ...] = ()) -> None:
        self._current_id = key_id_of(current_key)
        self._keys = {key_id_of(k): AESGCM(k) for k in (*retired_keys, current_key)}

    @classmethod
    def from_b64(cls, current: str, retired: str = "") -> SecretBox:
        """Build from base64 keys; `retired` is a comma-separated list."""
        olds = [decode_key(k) for k in retired.split(",") if k.strip()]
        return cls(decode_key(current), olds)

    @property
    def current_key_id(self) -> str:
        return self._current_id

    def key_id(self, token: str) -> str:
        """Return the key id a ciphertext was made with."""
        return self._split(token)[0]

    def encrypt(self, plaintext: str, aad: str) -> str:
        nonce = os.urandom(12)
        ct = self._keys[self._current_id].encrypt(nonce, plaintext.encode(), aad.encode())
        body = base64.urlsafe_b64encode(nonce + ct).decode().rstrip("=")
        return f"{_VERSION}.{self._current_id}.{body}"

    def decrypt(self, token: str, aad: str) -> str:
        kid, blob = self._split(token)
        aead = self._keys.get(kid)
        if aead is None:
            raise SecretBoxError(f"no key with id {kid} is configured")
        try:
            return aead.decrypt(blob[:12], blob[12:], aad.encode()).decode()
        except InvalidTag as exc:
            raise SecretBoxError("ciphertext does not decrypt with its key") from exc

    def needs_rotation(self, token: str) -> bool:
        """Return True if the ciphertext was made with a retired key."""
        return self.key_id(token) != self._current_id

    def rotate(self, token: str, aad: str) -> str:
        """Return the value re-encrypted under the current key."""
        return self.encrypt(self.decrypt(token, aad), aad)

    @staticmethod
    def _split(token: str) -> tuple[str, bytes]:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _VERSION:
            raise SecretBoxError("not a Tickwise ciphertext")
        try:
            blob = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        except (binascii.Error, ValueError) as exc:
            raise SecretBoxError("ciphertext body is not base64") from exc
        if len(blob) < 12 + 16:
            raise SecretBoxError("ciphertext is too short")
        return parts[1], blob
