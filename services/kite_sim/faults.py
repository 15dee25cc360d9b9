"""REST fault injection: latency, 5xx, timeout-after-accept, rejection, 429 bursts.

Faults model what a real broker does on a bad day, so that the executor's
retry and reconcile paths can be exercised against the same wire protocol.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass, field
from typing import Any

RATE_KEYS = ("error_rate", "timeout_after_accept_rate", "reject_rate")


class FaultConfigError(ValueError):
    """A fault setting is malformed."""


@dataclass(slots=True)
class FaultConfig:
    """Active fault settings; all off by default."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    timeout_after_accept_rate: float = 0.0
    reject_rate: float = 0.0
    burst_429: int = 0
    burst_500: int = 0
    routes: list[str] | None = None


@dataclass
class Faults:
    """Decide, per request, which fault (if any) applies."""

    seed: int = 1
    hold_seconds: float = 60.0
    config: FaultConfig = field(default_factory=FaultConfig)
    rng: random.Random = field(init=False)
    released: asyncio.Event = field(init=False)
    before_request: bool = field(init=False, default=False)
    """False while no latency, 5xx or 429 is set: requests then skip the per-request checks."""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed ^ 0x5EED)
        self.released = asyncio.Event()

    def update(self, payload: dict[str, Any]) -> FaultConfig:
        """Replace the settings with `payload` (missing keys mean off)."""
        cfg = FaultConfig()
        unknown = set(payload) - set(FaultConfig.__slots__)
        if unknown:
            raise FaultConfigError(f"unknown fault settings: {sorted(unknown)}")
        try:
            cfg.latency_ms = float(payload.get("latency_ms", 0) or 0)
            for key in RATE_KEYS:
                value = float(payload.get(key, 0) or 0)
                if not 0.0 <= value <= 1.0:
                    raise FaultConfigError(f"{key} must be within 0..1")
                setattr(cfg, key, value)
            cfg.burst_429 = int(payload.get("burst_429", 0) or 0)
            cfg.burst_500 = int(payload.get("burst_500", 0) or 0)
            routes = payload.get("routes")
            cfg.routes = [str(r) for r in routes] if routes else None
        except (TypeError, ValueError) as exc:
            raise FaultConfigError(str(exc)) from exc
        if cfg.latency_ms < 0 or cfg.burst_429 < 0 or cfg.burst_500 < 0:
            raise FaultConfigError("latency_ms, burst_429 and burst_500 must not be negative")
        self.release_held()
        self.config = cfg
        self.before_request = bool(cfg.latency_ms or cfg.error_rate or cfg.burst_429 or cfg.burst_500)
        return cfg

    def reset(self) -> None:
        """Turn every fault off and let held requests go."""
        self.release_held()
        self.config = FaultConfig()
        self.before_request = False
        self.rng = random.Random(self.seed ^ 0x5EED)

    def release_held(self) -> None:
        """Wake requests held by timeout-after-accept; later ones hold anew."""
        self.released.set()
        self.released = asyncio.Event()

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready data."""
        return asdict(self.config)

    def applies(self, route: str) -> bool:
        """Tell whether faults target this route group."""
        routes = self.config.routes
        return routes is None or route in routes

    def take_429(self, route: str) -> bool:
        """Consume one request of a 429 burst if one is pending."""
        return self._take_burst("burst_429", route)

    def take_500(self, route: str) -> bool:
        """Consume one request of a 500 burst if one is pending (a fault of exactly N requests)."""
        return self._take_burst("burst_500", route)

    def _take_burst(self, name: str, route: str) -> bool:
        cfg = self.config
        left = getattr(cfg, name)
        if left > 0 and self.applies(route):
            setattr(cfg, name, left - 1)
            return True
        return False

    def roll(self, rate: float, route: str) -> bool:
        """Draw whether a fault with this rate fires on this route."""
        return rate > 0.0 and self.applies(route) and self.rng.random() < rate

    async def hold(self) -> None:
        """Keep an accepted request unanswered until released or the hold ends."""
        try:
            await asyncio.wait_for(self.released.wait(), self.hold_seconds)
        except TimeoutError:
            pass
