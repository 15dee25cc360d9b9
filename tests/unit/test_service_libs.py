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


def test_registered_secrets_are_scrubbed_wherever_they_stand() -> None:
    from libs.service.logging import scrub

    register_secret("kitetok3nvalue")
    register_secret("pass word with spaces")
    for text in ("kitetok3nvalue", "url /x?t=kitetok3nvalue&y=1", "key:kitetok3nvalue,", "'kitetok3nvalue'",
                 "a/kitetok3nvalue/b", "said pass word with spaces!"):
        assert "kitetok3nvalue" not in scrub(text) and "pass word with spaces" not in scrub(text), text
    assert scrub("kitetok3nvalueX is another token") == "kitetok3nvalueX is another token"


def test_scrubbing_stays_fast_with_many_registered_secrets() -> None:
    import time

    from libs.service.logging import scrub

    for i in range(10_000):
        register_secret(f"secret-token-{i:06d}-abcdef")
    line = "order placed tag=TWEABCDEF order_id=261125000000001 " * 4
    started = time.perf_counter()
    for _ in range(1_000):
        scrub(line)
    per_call_ms = (time.perf_counter() - started)  # 1,000 calls: seconds == ms per call
    assert per_call_ms < 0.5, f"scrub took {per_call_ms:.3f} ms per line with 10k secrets"


def test_objects_and_deep_structures_are_scrubbed_too() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    register_secret("deep-secret-token-42")
    deep: dict = {"x": "deep-secret-token-42"}
    for _ in range(20):
        deep = {"next": deep}
    get_logger("t").error("broker call failed", error=RuntimeError("token k:deep-secret-token-42 refused"),
                          payload=deep, raw=b"access_token=deep-secret-token-42")
    assert "deep-secret-token-42" not in out.getvalue()
    assert json.loads(out.getvalue())["event"] == "broker call failed"
