"""Settings of the executor process (read once in main(), passed down, frozen)."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from libs.service.settings import ServiceSettings


class ExecutorSettings(ServiceSettings):
    """Executor and order-log writer settings; every field has a safe local default."""

    secret_key: str = Field("", validation_alias=AliasChoices("TICKWISE_SECRET_KEY", "SECRET_KEY"), repr=False)
    """Base64 AES-256 key that decrypts `broker:{user_id}` ciphertexts."""
    secret_keys_retired: str = Field(
        "", validation_alias=AliasChoices("TICKWISE_SECRET_KEYS_RETIRED", "SECRET_KEYS_RETIRED"), repr=False)
    """Comma-separated retired keys, still accepted for decryption."""
    kite_root: str | None = Field(None, validation_alias=AliasChoices("TICKWISE_KITE_ROOT", "KITE_ROOT"))
    """Kite REST root (the simulator's URL in paper mode; None = real Kite)."""
    consumer_name: str = ""
    """Consumer name in the group; empty = hostname-pid-random (one per process)."""

    max_in_flight: int = 64
    """Events handled at once by one process (one strategy's events are serialised by its lock)."""
    read_block_ms: int = 1000
    """XREADGROUP BLOCK: how long one read waits for new entries."""
    claim_idle_ms: int = 30_000
    """XAUTOCLAIM entries pending longer than this (above the slowest normal handling)."""
    heartbeat_ttl_ms: int = 3_000
    """TTL of this consumer's `executor:alive:{name}` key, renewed every third of it: once it is gone, the
    entries the consumer held are claimed at once instead of after claim_idle_ms."""
    event_early_tolerance_s: float = 2.0
    """A BUY/SELL handled more than this before its scheduled time is refused and dead-lettered (host clock skew)."""
    claim_interval_s: float = 2.0
    """How often the claimer looks for abandoned entries."""
    max_deliveries: int = 5
    """An entry delivered more often than this goes to the dead-letter stream."""

    lock_ttl_ms: int = 10_000
    """TTL of `lock_state:{id}`; renewed while held, so a crashed holder frees it this fast."""
    lock_wait_s: float = 15.0
    """How long an event waits for its strategy's lock before leaving the entry pending."""

    broker_connections: int = 256
    """Keep-alive HTTP connections to the broker, shared by all accounts (at most one call each at a time)."""
    broker_timeout_s: float = 5.0
    """HTTP timeout of one broker call."""
    fill_timeout_s: float = 3.0
    """How long to poll order history for COMPLETE/REJECTED/CANCELLED before retrying."""
    fill_poll_s: float = 0.05
    """Pause between order-history polls."""

    orders_per_s: int = 10
    """Kite's per-api_key order limit, shared by all executor replicas."""
    rate_window_ms: int = 1100
    """Window of the order limit: Kite's rolling second plus a margin for network skew."""
    rate_wait_max_s: float = 10.0
    """Longest wait for a rate-limit slot before the order is retried later."""

    retry_base_s: float = 0.5
    """First retry delay; doubles per attempt (full jitter)."""
    retry_cap_s: float = 30.0
    """Largest retry delay."""
    retry_max_attempts: int = 5
    """Attempts (first try included) before a run is aborted."""

    credentials_cache_s: float = 60.0
    """How long decrypted credentials stay in memory (keyed by ciphertext, so a new token is seen at once)."""
    redis_watch_interval_s: float = 1.0
    """How often `INFO server` run_id is polled to notice a Redis restart."""
    reconcile_pg_timeout_s: float = 3.0
    """How long reconciliation waits for Postgres before using the loaded configs instead."""

    writer_batch: int = 500
    """Order-log rows inserted per Postgres transaction."""
    writer_backoff_max_s: float = 5.0
    """Longest pause between Postgres reconnect attempts while it is down."""
