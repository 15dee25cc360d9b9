"""Wire the executor: Redis, broker gateway, handler, consumer, writer, reconciler, health."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid

from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from libs.broker.kite_rest import KiteOrderClient
from libs.schema import keys
from libs.service.health import HealthServer
from libs.service.lifecycle import sleep_unless_stopped
from libs.service.logging import get_logger
from libs.service.redis_client import connect_redis, server_run_id
from libs.service.secretbox import SecretBox
from libs.trading.calendar import MarketCalendar
from services.executor.consumer import OrderConsumer, ensure_group
from services.executor.credentials import CredentialStore
from services.executor.handler import OrderHandler
from services.executor.log_writer import OrderLogWriter
from services.executor.owners import OwnerWatch
from services.executor.placement import OrderPlacer
from services.executor.ratelimit import OrderRateLimiter
from services.executor.reconcile import START, Reconciler
from services.executor.settings import ExecutorSettings
from services.executor.state import OrderState


def consumer_name() -> str:
    """Return a consumer name unique to this process: hostname-pid-random."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ExecutorService:
    """One executor process: order consumer + order-log writer + reconciliation."""

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.name = settings.consumer_name or consumer_name()
        self.log = get_logger("executor", consumer=self.name)
        # In-flight events share one bound; each partition adds a blocked reader and a writer loop.
        self.redis = connect_redis(settings, max_connections=settings.max_in_flight * 2 + 16
                                   + 2 * settings.redis_partitions, health_check_interval=30)
        self.engine: AsyncEngine = create_async_engine(settings.database_url, pool_pre_ping=True, pool_size=2,
                                                       max_overflow=2, pool_timeout=settings.reconcile_pg_timeout_s)
        self.broker = KiteOrderClient(settings.kite_root, timeout_s=settings.broker_timeout_s,
                                      pool_size=settings.broker_connections)
        box = SecretBox.from_b64(settings.secret_key, settings.secret_keys_retired)
        self.credentials = CredentialStore(self.redis, box, ttl_s=settings.credentials_cache_s)
        self.state = OrderState(self.redis, lock_ttl_ms=settings.lock_ttl_ms, lock_wait_s=settings.lock_wait_s)
        limiter = OrderRateLimiter(self.redis, limit=settings.orders_per_s, window_ms=settings.rate_window_ms,
                                   max_wait_s=settings.rate_wait_max_s)
        placer = OrderPlacer(self.broker, limiter, fill_timeout_s=settings.fill_timeout_s,
                             fill_poll_s=settings.fill_poll_s)
        calendar = MarketCalendar(settings.market_calendar)
        self.handler = OrderHandler(settings, self.redis, self.state, self.credentials, placer, calendar)
        self.reconciler = Reconciler(self.redis, self.engine, self.credentials, self.broker, self.state, calendar,
                                     pg_timeout_s=settings.reconcile_pg_timeout_s, on_configs=self.handler.remember)
        self.owners = OwnerWatch(self.redis, self.credentials, self.handler.prime,
                                 block_ms=settings.read_block_ms)
        self.consumer = OrderConsumer(settings, self.redis, self.handler, self.name, self.on_state_lost)
        self.writer = OrderLogWriter(self.redis, self.engine, self.name, batch=settings.writer_batch,
                                     block_ms=settings.read_block_ms, claim_idle_ms=settings.claim_idle_ms,
                                     backoff_max_s=settings.writer_backoff_max_s)
        self.health = HealthServer(settings.health_host, settings.health_port, service="executor",
                                   checks={"redis": self._ping_redis, "consuming": self._consuming})
        self._redis_run_id: str | None = None
        self._reconcile_lock = asyncio.Lock()
        self.ready = asyncio.Event()

    async def _ping_redis(self) -> None:
        await self.redis.ping()

    async def _consuming(self) -> None:
        # Ready once the start-up reconciliation is done and entries are being read
        # (Postgres is deliberately not a readiness condition: trading goes on without it).
        if not self.ready.is_set() or not self.consumer.resume.is_set():
            raise RuntimeError("not consuming (starting or reconciling)")

    async def _server_run_id(self) -> str:
        return await server_run_id(self.redis)

    async def recover(self, trigger: str) -> None:
        """Pause consuming, create the groups, rebuild runtime from the broker, resume."""
        async with self._reconcile_lock:
            self.consumer.resume.clear()
            try:
                for partition in range(keys.partition_count()):
                    await ensure_group(self.redis, keys.orders_stream(partition), keys.EXECUTORS_GROUP)
                    await ensure_group(self.redis, keys.order_logs_stream(partition), keys.LOG_WRITERS_GROUP)
                await self.reconciler.run(trigger)
            finally:
                self.consumer.resume.set()

    async def on_state_lost(self, reason: str) -> None:
        self.log.warning("redis lost state; reconciling before consuming again", reason=reason)
        try:
            await self.recover("state_lost")
        except (RedisError, OSError) as error:  # the next read hits NOGROUP again and retries
            self.log.error("reconciliation failed; will retry", error=f"{type(error).__name__}: {error}")
            await asyncio.sleep(0.5)
        except Exception:  # a bug must not end the consumer; the next read retries
            self.log.exception("reconciliation failed; will retry")
            await asyncio.sleep(0.5)

    async def _watch_redis(self, stop: asyncio.Event) -> None:
        """Poll `INFO server` run_id; a new one means Redis restarted and may have lost writes."""
        while not stop.is_set():
            if await sleep_unless_stopped(stop, self.settings.redis_watch_interval_s):
                return
            try:
                run_id = await self._server_run_id()
            except RedisError:
                continue
            if run_id != self._redis_run_id:
                self.log.warning("redis restarted; reconciling", old_run_id=self._redis_run_id, run_id=run_id)
                self._redis_run_id = run_id
                try:
                    await self.recover("redis_restart")
                except (RedisError, OSError) as error:  # keep watching; the next poll retries
                    self._redis_run_id = None
                    self.log.error("reconciliation failed; will retry", error=str(error))
                except Exception:  # keep watching; the next poll retries
                    self._redis_run_id = None
                    self.log.exception("reconciliation failed; will retry")

    async def _warm_redis_pool(self) -> None:
        """Open now the Redis connections a full burst needs, rather than all at once when it arrives.

        A new connection costs several round trips (connect, HELLO, CLIENT SETINFO); 64 opened
        at the open's first second delay its first orders by ~0.3 s on a loaded 2-core host.
        """
        with contextlib.suppress(RedisError):
            await asyncio.gather(*(self.redis.ping() for _ in range(self.settings.max_in_flight)))

    async def _wait_for_redis(self, stop: asyncio.Event) -> bool:
        while not stop.is_set():
            try:
                self._redis_run_id = await self._server_run_id()
                return True
            except RedisError as error:
                self.log.warning("waiting for redis", error=str(error))
                await sleep_unless_stopped(stop, 0.5)
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain and close everything."""
        self.health_port = await self.health.start()
        try:
            if not await self._wait_for_redis(stop):
                return
            await self.owners.mark()  # before reconciling: a run started meanwhile is learned after it
            await self.recover(START)
            await self._warm_redis_pool()
            self.ready.set()
            self.log.info("executor consuming", stream=keys.ORDERS_STREAM, partitions=keys.partition_count(),
                          group=keys.EXECUTORS_GROUP,
                          health_port=self.health_port)
            writer_stop = asyncio.Event()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._watch_redis(stop), name="redis-watch")
                writer = tasks.create_task(self.writer.run(writer_stop), name="order-log-writer")
                tasks.create_task(self.owners.run(writer_stop), name="owner-watch")
                await self.consumer.run(stop)
                # The writer outlives the consumer so that the rows of drained
                # events are flushed when Postgres is up (otherwise they wait).
                writer_stop.set()
                await writer
        finally:
            await self.close()

    async def close(self) -> None:
        await self.health.stop()
        await self.broker.aclose()
        await self.engine.dispose()
        await self.redis.aclose()
        self.log.info(f"executor stopped processed={self.handler.processed} failed={self.handler.failed}",
                      processed=self.handler.processed, failed=self.handler.failed, rows_written=self.writer.written)
