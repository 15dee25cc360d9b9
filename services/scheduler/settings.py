"""Settings of the scheduler (read once in main())."""

from __future__ import annotations

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
