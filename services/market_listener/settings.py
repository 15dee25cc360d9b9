"""Settings of the market listener (read once in main())."""

from __future__ import annotations

from pydantic import Field

from libs.schema import keys
from libs.service.settings import ServiceSettings


class ListenerSettings(ServiceSettings):
    """Market listener settings; every field has a safe local default."""

    kite_root: str | None = None
    """Kite REST root (instruments list); None means the real Kite API."""
    kite_ws_root: str | None = None
    """Kite ticker WebSocket root; None means the real Kite ticker."""
    market_data_api_key: str = Field("", repr=False)
    """api_key of the designated market-data account (ticks are the same for every user)."""
    market_data_access_token: str = Field("", repr=False)
    """access_token of the market-data account."""
    exchange: str = "NSE"
    """Exchange whose instruments are watched."""
    price_write_interval_s: float = 0.1
    """Write `price:{SYM}` at most this often per symbol (always the latest price)."""
    watchdog_silence_s: float = 10.0
    """No tick for this long on any subscribed token while the market is open: reconnect."""
    watchdog_max_attempts: int = 5
    """Reconnects in a row without a tick before the process exits non-zero."""
    control_block_ms: int = 1000
    """XREAD BLOCK on control:strategies; bounds how long shutdown waits for the reader."""
    stoploss_marker_ttl_s: int = keys.RUN_MARKER_TTL_S
    """TTL of the one-STOPLOSS-per-run marker (two days: outlives any trading day)."""
    trigger_retry_s: float = 0.5
    """After a STOPLOSS could not be written to Redis, retry at the last price this soon."""
