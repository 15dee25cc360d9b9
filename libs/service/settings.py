"""Settings shared by every Tickwise process (pydantic-settings, read once in main())."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    """Accept both TICKWISE_<NAME> and the bare <NAME> written to .run/stack.env."""
    return AliasChoices(f"TICKWISE_{name}", name)


class ServiceSettings(BaseSettings):
    """Base settings: connection URLs, logging, health port, market calendar."""

    model_config = SettingsConfigDict(env_prefix="TICKWISE_", frozen=True, extra="ignore", populate_by_name=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_env("REDIS_URL"), repr=False)
    """Redis URL: runtime state, schedule and streams (may carry a password: kept out of repr)."""
    redis_cluster: bool = False
    """True: `redis_url` names one node of a Redis Cluster (the client learns the rest and follows MOVED)."""
    redis_partitions: int = Field(1, ge=1, le=1024)
    """N, the partitions of the shared Redis keys (docs/cluster.md); the same in every process."""
    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/tickwise", validation_alias=_env("DATABASE_URL"), repr=False
    )
    """SQLAlchemy URL of Postgres (users, strategies, order_logs; may carry a password: kept out of repr)."""
    log_level: str = "INFO"
    """Minimum log level."""
    log_format: Literal["json", "console"] = "json"
    """JSON for services, console for humans."""
    market_calendar: Literal["nse", "always_open"] = "nse"
    """`nse`: NSE trading days and session hours; `always_open`: paper trading at any hour."""
    health_host: str = "127.0.0.1"
    """Interface of the /healthz, /readyz, /metrics server."""
    health_port: int = 0
    """Port of the /healthz, /readyz, /metrics server (0 = pick a free one)."""
    shutdown_grace_s: float = 10.0
    """How long SIGTERM waits for in-flight work before cancelling it."""
