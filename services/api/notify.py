"""Deliver notifications at least once, off the trading path: webhook (signed) and Telegram.

Contract:
- Producers XADD a `Notice` to `notify:events` of a partition (the executor
  inside its commit script, in the strategy's partition; the API for its own
  events, in the user's). Trading never waits on delivery.
- A deliverer (a background task of each API process, owned by aiohttp's
  cleanup_ctx) reads every partition's stream in group `notifiers`, and fans each notice out
  into one delivery per configured channel of its user: HSET `notify:pending`
  + ZADD `notify:schedule` + XACK in one transaction, so nothing is lost
  between the stream and the schedule (all three share the partition's slot).
- Due deliveries are claimed by a script that pushes their score one lease
  ahead (another replica, or this one after a crash, retries after the lease),
  and sent with a timeout, at most `notify_concurrency` at once: a hanging or
  failing receiver only holds its own delivery slot.
- Success removes the delivery; failure reschedules it with exponential
  backoff and jitter; after `notify_max_attempts` it moves to `notify:dead`.
- Receivers deduplicate by the notice id (header `X-Tickwise-Event-Id`);
  webhook bodies are signed (`services.api.notify_send`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import orjson
import structlog
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from libs.schema import keys
from libs.schema.models.notify import Notice
from libs.schema.tables import NotificationSettings
from libs.service.backoff import backoff_delay
from libs.service.lifecycle import sleep_unless_stopped
from libs.service.outage import POSTGRES_UNAVAILABLE
from libs.service.secretbox import SecretBox
from libs.trading.calendar import IST
from services.api.deps import BOX, READS, REDIS, SETTINGS
from services.api.notify_send import RefusedTarget, Senders
from services.api.settings import ApiSettings

log = structlog.get_logger("api.notify")

SETTINGS_CACHE_S = 5.0
SHUTDOWN_GRACE_S = 1.0

# Claiming pushes a delivery's score one lease ahead: if its sender dies, it comes due again.
_CLAIM = """
-- KEYS: [1] notify:schedule (zset), [2] notify:pending (hash)
-- ARGV: [1] now ms, [2] lease ms, [3] max count
-- Returns: the claimed deliveries, flat {member, payload, ...}; a due member without a payload
--          (settled meanwhile) is dropped from the schedule, not returned
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, member in ipairs(due) do
  local payload = redis.call('HGET', KEYS[2], member)
  if payload then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), member)
    table.insert(out, member)
    table.insert(out, payload)
  else
    redis.call('ZREM', KEYS[1], member)
  end
end
return out
"""


def secret_aad(user_id: UUID) -> str:
    return f"notification_settings:{user_id}:webhook_secret"


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


async def emit(redis: Redis, notice: Notice) -> None:
    """Queue a notice for delivery (the API's own events: token expired, kill switch, test), in its user's partition."""
    await redis.xadd(keys.notify_stream(keys.partition_of(notice.user_id)), {"notice": notice.model_dump_json()},
                     maxlen=keys.NOTIFY_MAXLEN, approximate=True)


async def token_expired(redis: Redis, user_id: UUID) -> None:
    """Tell the user their Kite token needs a new login (one notice id per user and IST day)."""
    now = datetime.now(UTC)
    day = now.astimezone(IST).date().isoformat()
    await emit(redis, Notice(id=f"token-expired-{user_id}-{day}", type="token_expired", user_id=user_id,
                             occurred_at=now, data={"message": "the broker refused the access token"}))


async def kill_switch_used(redis: Redis, user_id: UUID, data: dict[str, Any]) -> None:
    """Tell the user their kill switch was pressed, and what it did."""
    await emit(redis, Notice(id=f"kill-switch-{uuid4()}", type="kill_switch", user_id=user_id,
                             occurred_at=datetime.now(UTC), data=data))


@dataclass(frozen=True)
class Target:
    """One user's channels, decrypted for sending."""

    webhook_url: str | None
    webhook_secret: str | None
    telegram_chat_id: str | None


class Deliverer:
    """Move notices from the stream into the schedule, and send what is due."""

    def __init__(self, app: web.Application, redis: Redis, name: str) -> None:
        self.app, self.redis, self.name = app, redis, name
        self.settings: ApiSettings = app[SETTINGS]
        self.box: SecretBox = app[BOX]
        self._claim = redis.register_script(_CLAIM)
        self._targets: dict[UUID, tuple[float, Target | None]] = {}
        self._inflight: set[asyncio.Task[None]] = set()  # at most notify_concurrency
        self.send: Senders | None = None
        self.sent = self.failed = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Fan out and dispatch every partition until `stop`; then give deliveries in flight a short grace."""
        partitions = range(keys.partition_count())
        for partition in partitions:
            await self._ensure_group(partition)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.notify_timeout_s),
                                         connector=aiohttp.TCPConnector(limit=0)) as http:
            self.send = Senders(self.settings, http)
            fan_outs = [asyncio.create_task(self._fan_out_loop(stop, p), name=f"notify-fan-out-{p}")
                        for p in partitions]
            try:
                await self._dispatch_loop(stop)
            finally:
                for task in fan_outs:
                    task.cancel()
                await asyncio.gather(*fan_outs, return_exceptions=True)
                # A short grace only: a cancelled delivery's lease runs out and it is sent again later.
                if self._inflight:
                    await asyncio.wait(self._inflight, timeout=SHUTDOWN_GRACE_S)
                pending = list(self._inflight)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        log.info("notifier stopped", sent=self.sent, failed=self.failed)

    async def _ensure_group(self, partition: int) -> None:
        try:
            await self.redis.xgroup_create(keys.notify_stream(partition), keys.NOTIFIERS_GROUP, id="0",
                                           mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- stream -> schedule ------------------------------------------------------------------
    async def _fan_out_loop(self, stop: asyncio.Event, partition: int) -> None:
        stream = keys.notify_stream(partition)
        pending_first = True
        while not stop.is_set():
            try:
                # Our own unacked entries first (a restart), then new ones.
                reply = await self.redis.xreadgroup(keys.NOTIFIERS_GROUP, self.name,
                                                    {stream: "0" if pending_first else ">"},
                                                    count=100, block=None if pending_first else 1000)
                entries = [(i, f) for _s, es in reply or [] for i, f in es]
                if pending_first and not entries:
                    pending_first = False
                    continue
                for msg_id, fields in entries:
                    await self._fan_out(partition, msg_id, fields)
                await self._claim_abandoned(partition)
            except RedisError as exc:
                if "NOGROUP" in str(exc):
                    await self._ensure_group(partition)
                    continue
                log.warning("notify stream read failed; retrying", error=str(exc)[:200])
                await sleep_unless_stopped(stop, 1)
            except POSTGRES_UNAVAILABLE as exc:  # entries stay pending and are claimed again
                log.warning("postgres unavailable for notify fan-out; retrying", error=type(exc).__name__)
                await sleep_unless_stopped(stop, 1)
            except Exception:  # a bug in one fan-out must not stop delivery; entries stay pending
                log.exception("notify fan-out failed; retrying", partition=partition)
                await sleep_unless_stopped(stop, 1)

    async def _claim_abandoned(self, partition: int) -> None:
        # Entries read by a deliverer that died before fanning them out.
        _next, claimed, *_ = await self.redis.xautoclaim(keys.notify_stream(partition), keys.NOTIFIERS_GROUP,
                                                         self.name, min_idle_time=60_000, count=50)
        for msg_id, fields in claimed or []:
            if fields:
                await self._fan_out(partition, msg_id, fields)

    async def _fan_out(self, partition: int, msg_id: bytes, fields: dict[bytes, bytes]) -> None:
        stream = keys.notify_stream(partition)
        try:
            notice = Notice.model_validate_json(fields.get(b"notice", b""))
        except ValueError:
            log.error("notice unreadable; dropped", msg_id=msg_id.decode())
            await self.redis.xack(stream, keys.NOTIFIERS_GROUP, msg_id)
            return
        target = await self._target(notice.user_id)
        channels = [c for c, on in (("webhook", target and target.webhook_url),
                                    ("telegram", target and target.telegram_chat_id
                                     and self.settings.telegram_bot_token)) if on]
        now_ms = int(time.time() * 1000)
        # One slot: the partition's stream, schedule and pending hash share its hash tag.
        async with self.redis.pipeline(transaction=True) as pipe:
            for channel in channels:
                member = f"{notice.id}|{channel}"
                payload = orjson.dumps({"notice": notice.model_dump(mode="json"), "channel": channel, "attempt": 0})
                pipe.hsetnx(keys.notify_pending(partition), member, payload)
                pipe.zadd(keys.notify_schedule(partition), {member: now_ms}, nx=True)
            pipe.xack(stream, keys.NOTIFIERS_GROUP, msg_id)
            pipe.xdel(stream, msg_id)
            await pipe.execute()

    async def _target(self, user_id: UUID) -> Target | None:
        cached = self._targets.get(user_id)
        if cached is not None and time.monotonic() - cached[0] < SETTINGS_CACHE_S:
            return cached[1]
        async with self.app[READS]() as session:
            row = await session.get(NotificationSettings, user_id)
        target = None
        if row is not None and (row.webhook_url or row.telegram_chat_id):
            secret = self.box.decrypt(row.webhook_secret, secret_aad(user_id)) if row.webhook_secret else None
            target = Target(row.webhook_url, secret, row.telegram_chat_id)
        if len(self._targets) > 10_000:
            self._targets.clear()
        self._targets[user_id] = (time.monotonic(), target)
        return target

    # -- schedule -> receivers ---------------------------------------------------------------
    async def _dispatch_loop(self, stop: asyncio.Event) -> None:
        lease_ms = int((self.settings.notify_timeout_s + 30) * 1000)
        while not stop.is_set():
            found = 0
            for partition in range(keys.partition_count()):
                free = self.settings.notify_concurrency - len(self._inflight)
                if free <= 0:
                    break
                try:
                    claimed = await self._claim(keys=[keys.notify_schedule(partition), keys.notify_pending(partition)],
                                                args=[int(time.time() * 1000), lease_ms, min(free, 100)])
                except RedisError as exc:
                    log.warning("notify schedule read failed; retrying", error=str(exc)[:200])
                    continue
                except Exception:  # what was claimed comes due again after its lease
                    log.exception("notify schedule claim failed", partition=partition)
                    continue
                found += len(claimed)
                for member, payload in zip(claimed[::2], claimed[1::2], strict=True):
                    task = asyncio.create_task(self._deliver(partition, member.decode(), payload))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
            if not found:
                await sleep_unless_stopped(stop, self.settings.notify_poll_s)

    async def _deliver(self, partition: int, member: str, payload: bytes) -> None:
        try:
            item = orjson.loads(payload)
            notice = Notice.model_validate(item["notice"])
            attempt = int(item["attempt"]) + 1
        except (ValueError, KeyError, TypeError):
            log.error("notification delivery unreadable; dropped", member=member)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(keys.notify_schedule(partition), member)
                pipe.hdel(keys.notify_pending(partition), member)
                await pipe.execute()
            return
        error = None
        assert self.send is not None
        try:
            target = await self._target(notice.user_id)
            if item["channel"] == "webhook":
                if target is None or not target.webhook_url or not target.webhook_secret:
                    error = None  # turned off meanwhile: nothing to send
                else:
                    await self.send.webhook(target.webhook_url, target.webhook_secret, notice)
            elif target is not None and target.telegram_chat_id:
                await self.send.telegram(target.telegram_chat_id, notice)
        except RefusedTarget as exc:
            error, attempt = str(exc), self.settings.notify_max_attempts  # retrying cannot help
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        except RedisError as exc:
            error = f"redis: {str(exc)[:200]}"
        except Exception as exc:  # settled as a failed attempt, never a lost delivery
            log.exception("notification attempt failed", notice_id=notice.id)
            error = f"{type(exc).__name__}"
        try:
            await self._settle(partition, member, item, notice, attempt, error)
        except RedisError as exc:
            log.warning("notify settle failed; the lease will retry it", member=member, error=str(exc)[:200])

    async def _settle(self, partition: int, member: str, item: dict[str, Any], notice: Notice, attempt: int,
                      error: str | None) -> None:
        schedule, pending = keys.notify_schedule(partition), keys.notify_pending(partition)
        if error is None:
            self.sent += 1
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(schedule, member)
                pipe.hdel(pending, member)
                await pipe.execute()
            return
        self.failed += 1
        if attempt >= self.settings.notify_max_attempts:
            log.error("notification dead-lettered", notice_id=notice.id, channel=item["channel"], attempts=attempt,
                      error=error)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(keys.notify_dead_stream(partition), {"notice": orjson.dumps(item["notice"]),
                                                               "channel": item["channel"], "attempts": attempt,
                                                               "error": error},
                          maxlen=keys.DEAD_MAXLEN, approximate=True)
                pipe.zrem(schedule, member)
                pipe.hdel(pending, member)
                await pipe.execute()
            return
        delay = backoff_delay(attempt, base=self.settings.notify_backoff_base_s,
                              cap=self.settings.notify_backoff_cap_s, jitter=True)
        log.warning("notification failed; retrying", notice_id=notice.id, channel=item["channel"], attempt=attempt,
                    retry_in_s=round(delay, 2), error=error)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(pending, member, orjson.dumps({**item, "attempt": attempt, "error": error}))
            pipe.zadd(schedule, {member: int((time.time() + delay) * 1000)})
            await pipe.execute()

NOTIFIER = web.AppKey("notifier", Deliverer)


async def notifier_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the deliverer for the app's lifetime (started after the pools, stopped before they close)."""
    if not app[SETTINGS].notify_enabled:
        yield
        return
    stop = asyncio.Event()
    deliverer = Deliverer(app, app[REDIS], f"api-{socket.gethostname()}-{os.getpid()}")
    app[NOTIFIER] = deliverer
    task = asyncio.create_task(deliverer.run(stop), name="notifier")
    try:
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, app[SETTINGS].notify_timeout_s + 5)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
