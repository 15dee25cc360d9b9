"""Secret box and log redaction."""

from __future__ import annotations

import io
import json

import pytest

from libs.service.logging import configure_logging, get_logger, register_secret
from libs.service.secretbox import SecretBox, SecretBoxError, generate_key


def test_secretbox_round_trip_with_fresh_nonce_and_bound_aad() -> None:
    box = SecretBox.from_b64(generate_key())
    a = box.encrypt("kite-secret", "broker_credentials:u1:api_secret")
    b = box.encrypt("kite-secret", "broker_credentials:u1:api_secret")
    assert a != b and "kite-secret" not in a
    assert box.decrypt(a, "broker_credentials:u1:api_secret") == "kite-secret"
    with pytest.raises(SecretBoxError):
        box.decrypt(a, "broker_credentials:u2:api_secret")


def test_secretbox_rotation_reads_old_and_writes_new() -> None:
    old, new = generate_key(), generate_key()
    token = SecretBox.from_b64(old).encrypt("v", "aad")
    box = SecretBox.from_b64(new, retired=old)
    assert box.needs_rotation(token)
    rotated = box.rotate(token, "aad")
    assert not box.needs_rotation(rotated)
    assert SecretBox.from_b64(new).decrypt(rotated, "aad") == "v"
    with pytest.raises(SecretBoxError):
        SecretBox.from_b64(new).decrypt(token, "aad")


def test_bad_keys_are_refused() -> None:
    with pytest.raises(SecretBoxError):
        SecretBox.from_b64("c2hvcnQ=")
    with pytest.raises(SecretBoxError):
        SecretBox.from_b64(generate_key()).decrypt("v1.x.y", "aad")


def test_logs_never_carry_secrets() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    register_secret("plain-access-token-123")
    log = get_logger("t")
    log.info("order placed", api_secret="s3cr3t-value", headers={"Authorization": "token k:v"},
             note="retrying with plain-access-token-123", password="hunter2hunter2")
    line = out.getvalue()
    for secret in ("s3cr3t-value", "token k:v", "plain-access-token-123", "hunter2hunter2"):
        assert secret not in line
    assert json.loads(line)["event"] == "order placed"
