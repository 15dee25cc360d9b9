"""Settings of the scheduler (read once in main())."""

from __future__ import annotations

from datetime import time

from pydantic import AliasChoices, Field

from libs.schema.models import ClockTime
from libs.service.settings import ServiceSettings


class SchedulerSettings(ServiceSettings):
    """Scheduler settings; every field has a safe local default."""

    batch_size: int = 500
    """Most due events moved to queue:orders by one Lua call (bounds the time Redis is blocked)."""
    max_sleep_s: float = 0.1
    """Longest sleep between checks of `schedule`, even without a wake-up publish."""
    grace_s: float = 30.0
    """A BUY found this late after a restart is still fired; later it fails the strategy."""
    redis_check_interval_s: float = 1.0
    """How often `INFO server` run_id is compared to detect a Redis restart."""
    rebuild_retry_max_s: float = 30.0
    """Longest backoff between attempts to rebuild from Postgres while it is down."""
    trim_interval_s: float = 60.0
    """How often acked entries are trimmed from queue:orders (nothing else trims it)."""
    secret_key: str = Field("", repr=False, validation_alias=AliasChoices("TICKWISE_SECRET_KEY", "SECRET_KEY"))
    """Base64 AES key of broker secrets, to read tokens for the pre-open check (empty: check off, warned)."""
    secret_keys_retired: str = Field("", repr=False, validation_alias=AliasChoices(
        "TICKWISE_SECRET_KEYS_RETIRED", "SECRET_KEYS_RETIRED"))
    """Comma-separated retired keys that still decrypt."""
    kite_root: str | None = Field(None, validation_alias=AliasChoices("TICKWISE_KITE_ROOT", "KITE_ROOT"))
    """Kite REST root for the token check's profile calls; None = the real Kite API."""
    kite_timeout_s: float = 7.0
    """Timeout of one profile call."""
    preopen_check_time: ClockTime = time(8, 45)
    """IST time, on trading days, of the token check of every account with running strategies."""
    rearm_interval_s: float = Field(1.0, gt=0)
    """How often ended runs of repeating strategies are looked for (and armed for their next day)."""
