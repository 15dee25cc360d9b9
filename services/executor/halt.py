"""The operator-wide halt, read cheaply on the entry path.

While `tickwise:halt` exists (set and cleared with redis-cli), no new entry goes
to the broker; exits are never held back. The key is read at most once per
`ttl_s` per process (a GET only when a BUY is due and the last read is older),
so the hot path mostly pays nothing; a halt takes effect within `ttl_s`.
"""

from __future__ import annotations

import time

from prometheus_client import Gauge
from redis.asyncio import Redis

from libs.schema import keys
from libs.service.logging import get_logger

HALTED = Gauge("executor_operator_halt", "1 while the operator halt key is set (no new entries).")


class OperatorHalt:
    """Answer whether the operator halted new entries, from a short-lived cached read."""

    def __init__(self, redis: Redis, *, ttl_s: float = 1.0) -> None:
        self.redis, self.ttl_s = redis, ttl_s
        self._until = 0.0
        self._reason: str | None = None
        self.log = get_logger("executor")

    async def reason(self) -> str | None:
        """Return the halt's reason text while halted, else None."""
        now = time.monotonic()
        if now < self._until:
            return self._reason
        raw = await self.redis.get(keys.OPERATOR_HALT)
        reason = None if raw is None else (raw.decode(errors="replace").strip() or "no reason given")[:200]
        if reason != self._reason:
            if reason is None:
                self.log.warning("operator halt cleared: new entries allowed again")
            else:
                self.log.warning("operator halt set: no new entries", reason=reason, key=keys.OPERATOR_HALT)
        self._reason, self._until = reason, now + self.ttl_s
        HALTED.set(0 if reason is None else 1)
        return reason
