"""Settings of the API process, read once in main() and passed down."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from libs.schema import keys
from libs.service.settings import ServiceSettings


class ApiSettings(ServiceSettings):
    """Everything the HTTP API needs: listen address, auth, crypto, broker, limits."""

    api_port: int = 8080
    """Port of the API when TICKWISE_HEALTH_PORT is not set (the API serves health on its own port)."""
    jwt_secret: str = Field("", repr=False)
    """HS256 signing secret; empty = derived from the secret key (HKDF), so one secret suffices."""
    jwt_lifetime_s: int = Field(12 * 3600, ge=60)
    """Lifetime of an access token in seconds (default 12 h)."""
    secret_key: str = Field("", repr=False)
    """Base64 32-byte AES-256-GCM key for broker secrets; required unless dev_mode."""
    secret_keys_retired: str = Field("", repr=False)
    """Comma-separated retired keys: still decrypt, re-encrypted under secret_key on read."""
    dev_mode: bool = False
    """Allow starting without secret_key (an ephemeral key is generated, loudly)."""
    kite_root: str | None = Field(None, validation_alias=AliasChoices("TICKWISE_KITE_ROOT", "KITE_ROOT"))
    """Kite REST root; None = the real Kite API, else the paper broker's URL."""
    kite_timeout_s: float = 7.0
    """Timeout of one broker call."""
    client_max_size: int = Field(64 * 1024, ge=1024)
    """Largest accepted request body in bytes (413 above)."""
    sell_safety_margin_s: int = Field(120, ge=0)
    """Sell times must be this far before the MIS square-off at 15:20 IST (nse calendar)."""
    login_max_failures: int = Field(5, ge=1)
    """Failed logins allowed per email and per client address in a window; then 429."""
    login_window_s: int = Field(60, ge=1)
    """Length of the failed-login window in seconds."""
    login_email_max_failures: int = Field(50, ge=1)
    """Ceiling of failed logins per email from all addresses together in `login_email_window_s`; then 429."""
    login_email_window_s: int = Field(900, ge=1)
    """Length of the per-email failed-login window in seconds."""
    register_max_per_addr: int = Field(30, ge=1)
    """Registrations allowed per client address in `register_window_s`; then 429."""
    register_window_s: int = Field(600, ge=1)
    """Length of the registration window in seconds."""
    hash_queue_max: int = Field(32, ge=1)
    """New password hashes (registration, password change) allowed to wait for a thread; more get 503."""
    trust_forwarded_for: bool = False
    """Take the client address from the last X-Forwarded-For entry (only behind one trusted proxy that appends it)."""
    argon2_time_cost: int = Field(3, ge=1)
    """argon2id iterations."""
    argon2_memory_kib: int = Field(65536, ge=1024)
    """argon2id memory in KiB."""
    hash_workers: int = Field(4, ge=1)
    """Threads hashing passwords (CPU-bound, off the event loop)."""
    db_pool_size: int = Field(10, ge=1)
    """SQLAlchemy pool size."""
    redis_max_connections: int = Field(64, ge=1)
    """Size of the Redis connection pool."""
    stop_lock_wait_s: float = Field(5.0, ge=0)
    """How long stop waits for an executor holding the strategy's lock (an order in flight)."""
    stop_lock_ttl_ms: int = Field(10_000, ge=100)
    """TTL of the strategy's lock while a stop holds it; renewed while held, so a crashed API frees it this fast."""
    instruments_ttl_s: int = Field(keys.INSTRUMENTS_TTL_S, ge=60)
    """TTL of the daily instruments cache."""
    stream_interval_s: float = Field(1.0, ge=0.1, le=60)
    """How often a dashboard event stream looks for changes."""
    stream_ticket_ttl_s: int = Field(60, ge=5, le=3600)
    """Lifetime of a stream ticket (it only opens the caller's event stream)."""
    notify_enabled: bool = True
    """Run the notification deliverer in this process (every API replica may)."""
    notify_timeout_s: float = Field(5.0, gt=0, le=60)
    """Timeout of one webhook or Telegram call: a hanging receiver costs at most this per attempt."""
    notify_max_attempts: int = Field(8, ge=1, le=50)
    """Attempts per delivery before it is dead-lettered to notify:dead."""
    notify_backoff_base_s: float = Field(1.0, gt=0)
    """First retry delay; doubles per attempt, with jitter."""
    notify_backoff_cap_s: float = Field(300.0, gt=0)
    """Longest retry delay."""
    notify_concurrency: int = Field(200, ge=1, le=10_000)
    """Deliveries in flight at once per process."""
    notify_poll_s: float = Field(0.25, gt=0, le=10)
    """How often due deliveries are looked for when none were due."""
    notify_allow_private_targets: bool | None = None
    """Allow webhooks to loopback/private addresses; unset = only when trading on the paper broker."""
    telegram_bot_token: str = Field("", repr=False)
    """The operator's Telegram bot token; empty = Telegram notifications off."""
    telegram_api_base: str = "https://api.telegram.org"
    """Telegram Bot API base URL (tests point it at a local receiver)."""
    kite_login_root: str | None = None
    """Root of Kite's browser login (`/connect/login`); None = the simulator's kite_root in paper mode,
    else https://kite.zerodha.com."""
    login_state_ttl_s: int = Field(600, ge=30, le=3600)
    """How long a Kite login link (its signed `state`) stays usable, once."""
    dashboard_url: str = Field("/", repr=False)
    """Where the Kite login callback sends the browser back to (with `?broker_login=...`)."""
    token_check_cache_s: float = Field(30.0, ge=0)
    """Start reuses the broker's `valid` answer about a token this long before asking again."""
    kill_switch_lock_wait_s: float = Field(15.0, ge=0)
    """How long the kill switch waits per strategy for an order in flight before answering `busy`."""

    @property
    def login_root(self) -> str:
        """Return where `/connect/login` is served: Kite's login site, or the paper broker."""
        return (self.kite_login_root or self.kite_root or "https://kite.zerodha.com").rstrip("/")

    @property
    def port(self) -> int:
        """Return the one port serving the API, health and metrics."""
        return self.health_port or self.api_port
