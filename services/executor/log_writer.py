"""Copy order-log rows from `queue:order_logs` into Postgres, exactly once per row.

Group `log-writers`, one consumer per process. Rows are inserted in batches
with `ON CONFLICT (id) DO NOTHING` (the id is derived from the stream entry,
so a row delivered twice is inserted once), and in the same transaction a
row's terminal outcome is applied: `UPDATE strategies SET status=exited|failed
... WHERE id=.. AND status='running' AND started_at=<the row's run>`, so a stop
or a newer run is never overwritten. Entries are acked (and deleted: the
stream is a buffer, Postgres the record) only after the commit. While Postgres
is down the batch is retried with capped backoff, forever: rows wait in the
stream, nothing is acked or lost, and trading goes on (the order path never
touches Postgres). A row Postgres refuses for good goes to
`queue:order_logs:dead`. With N partitions each partition's stream has its
group and its own loop here (a cluster cannot read several slots in one call).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import and_, text, update
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import func

from libs.schema import keys
from libs.schema.models import OrderLogRow, StrategyStatus
from libs.schema.tables import OrderLog, Strategy
from libs.service.backoff import Backoff
from libs.service.lifecycle import sleep_unless_stopped
from libs.service.logging import get_logger
from libs.service.outage import POSTGRES_UNAVAILABLE
from libs.service.redis_client import as_text
from services.executor import metrics
from services.executor.consumer import ensure_group, is_nogroup

_PERMANENT = (IntegrityError, DataError)
# One statement per batch whatever its size: the rows go as one JSON array that
# Postgres turns back into rows (jsonb_to_recordset), so the driver binds one
# string (encoded by orjson in one call) instead of a statement, or an array per
# column, with every value adapted in Python. The owner comes from `strategies`
# for a row that has none (a skip of an unloaded run).
_COLUMNS = {"id": "uuid", "strategy_id": "uuid", "user_id": "uuid", "event_type": "order_event_type",
            "request_payload": "jsonb", "response_payload": "jsonb", "status": "order_log_status",
            "created_at": "timestamptz", "trading_day": "date", "broker_order_id": "text", "tag": "text",
            "stream_msg_id": "text"}
_INSERT_ROWS = text(
    f"INSERT INTO {OrderLog.__tablename__} ({', '.join(_COLUMNS)}) SELECT {', '.join(_COLUMNS)} "
    "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r("
    + ", ".join(f"{c} {t}" for c, t in _COLUMNS.items())
    + ") ON CONFLICT (id) DO NOTHING")
_OWNERS = text("SELECT id, user_id FROM strategies WHERE id = ANY(CAST(:ids AS uuid[]))")


class OrderLogWriter:
    """Batch rows from the stream into `order_logs` and apply terminal statuses."""

    def __init__(self, redis: Redis, engine: AsyncEngine, name: str, *, batch: int, block_ms: int,
                 claim_idle_ms: int, backoff_max_s: float) -> None:
        self.redis, self.engine, self.name = redis, engine, name
        self.batch, self.block_ms, self.claim_idle_ms, self.backoff_max_s = batch, block_ms, claim_idle_ms, backoff_max_s
        self.log = get_logger("executor.log_writer", consumer=name)
        self.written = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Write rows of every partition until `stop`; a batch being retried is left pending for the next writer."""
        async with asyncio.TaskGroup() as loops:
            for partition in range(keys.partition_count()):
                loops.create_task(self._run_partition(stop, partition), name=f"order-log-writer-{partition}")

    async def _run_partition(self, stop: asyncio.Event, partition: int) -> None:
        stream = keys.order_logs_stream(partition)
        await ensure_group(self.redis, stream, keys.LOG_WRITERS_GROUP)
        claim_at = 0.0
        loop = asyncio.get_running_loop()
        drained = False
        # On stop, keep going until a read comes back empty, so the rows of the
        # last drained events reach Postgres now rather than after a claim.
        while not (stop.is_set() and drained):
            drained = False
            try:
                if loop.time() >= claim_at:
                    claim_at = loop.time() + max(1.0, self.claim_idle_ms / 4000)
                    entries = await self._claimed(stream)
                else:
                    entries = []
                if not entries:
                    reply = await self.redis.xreadgroup(keys.LOG_WRITERS_GROUP, self.name,
                                                        {stream: ">"}, count=self.batch,
                                                        block=self.block_ms)
                    entries = [(as_text(i), f) for _s, es in reply or [] for i, f in es]
                if entries and not await self.write(entries, stop, partition):
                    return  # stopping while Postgres is down: the rows wait in the stream for the next writer
                drained = not entries
                await self._update_lag(stream)
            except ResponseError as error:
                if is_nogroup(error) or "no longer exists" in str(error):
                    # Redis lost the stream (flush or restart): recreate and go on.
                    with contextlib.suppress(RedisError):
                        await ensure_group(self.redis, stream, keys.LOG_WRITERS_GROUP)
                    continue
                self.log.error("redis refused a command; retrying", error=str(error))
                drained = stop.is_set()
                await sleep_unless_stopped(stop, 0.5)
            except RedisError as error:
                self.log.warning("redis unavailable; retrying", error=str(error))
                drained = stop.is_set()
                await sleep_unless_stopped(stop, 0.5)
            except Exception:  # the writer must outlive any one bad batch
                self.log.exception("order-log writer loop failed; retrying")
                drained = stop.is_set()
                await sleep_unless_stopped(stop, 1.0)

    async def _claimed(self, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
        reply: Any = await self.redis.xautoclaim(stream, keys.LOG_WRITERS_GROUP, self.name,
                                                 min_idle_time=self.claim_idle_ms, start_id="0-0", count=self.batch)
        return [(as_text(i), f) for i, f in reply[1] if f is not None]

    async def write(self, entries: list[tuple[str, dict[bytes, bytes]]], stop: asyncio.Event,
                    partition: int = 0) -> bool:
        """Commit a batch of `partition`'s stream (retrying through outages), then ack and delete it.

        Return False if stopped first.
        """
        stream = keys.order_logs_stream(partition)
        rows: list[tuple[str, OrderLogRow]] = []
        for msg_id, fields in entries:
            try:
                rows.append((msg_id, OrderLogRow.model_validate_json(fields[b"row"])))
            except (KeyError, ValidationError, ValueError) as error:
                await self._dead(msg_id, fields.get(b"row", b""), f"malformed row: {error}", partition)
        backoff = Backoff(base=0.1, cap=self.backoff_max_s)
        while rows:
            try:
                refused = await self._commit(rows)
                metrics.WRITER_UP.set(1)
                break
            except _PERMANENT as error:
                # One bad row must not block the rest: fall back to one row per transaction.
                self.log.warning("batch refused; writing rows one by one", error=str(error.orig))
                refused = await self._commit_each(rows)
                break
            except POSTGRES_UNAVAILABLE as error:
                # Wait it out, lose nothing. Any other error is a bug: it goes up to the loop,
                # which logs it with its traceback; the batch stays pending (nothing acked)
                # and is claimed again, and the row ids keep a second insert out.
                metrics.WRITER_UP.set(0)
                delay = backoff.next()
                self.log.warning("postgres unavailable; order-log rows wait in the stream",
                                 rows=len(rows), retry_in_s=round(delay, 2), error=f"{type(error).__name__}")
                if stop.is_set():
                    return False
                if await sleep_unless_stopped(stop, delay):
                    return False
        else:
            refused = {}
        for msg_id, reason in refused.items():
            raw = next(f.get(b"row", b"") for i, f in entries if i == msg_id)
            await self._dead(msg_id, raw, reason, partition)
        done = [msg_id for msg_id, _ in rows if msg_id not in refused]
        if done:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(stream, keys.LOG_WRITERS_GROUP, *done)
                pipe.xdel(stream, *done)
                await pipe.execute()
            self.written += len(done)
            metrics.WRITER_ROWS.inc(len(done))
        return True

    async def _commit(self, rows: list[tuple[str, OrderLogRow]]) -> dict[str, str]:
        """Insert the batch in one transaction; return rows refused (unknown strategy) by msg id."""
        async with self.engine.begin() as conn:
            return await self._insert(conn, rows)

    async def _commit_each(self, rows: list[tuple[str, OrderLogRow]]) -> dict[str, str]:
        refused: dict[str, str] = {}
        for msg_id, row in rows:
            try:
                async with self.engine.begin() as conn:
                    refused.update(await self._insert(conn, [(msg_id, row)]))
            except _PERMANENT as error:
                refused[msg_id] = f"postgres refused the row: {type(error.orig).__name__}: {error.orig}"[:500]
        return refused

    async def _insert(self, conn: AsyncConnection, rows: list[tuple[str, OrderLogRow]]) -> dict[str, str]:
        ids = list({row.strategy_id for _, row in rows})
        owners: dict[UUID, UUID] = dict((await conn.execute(_OWNERS, {"ids": ids})).all())
        refused = {m: f"unknown strategy {r.strategy_id}" for m, r in rows if r.strategy_id not in owners}
        values = [_values(row, owners[row.strategy_id]) for m, row in rows if m not in refused]
        if values:
            await conn.execute(_INSERT_ROWS, {"rows": _json(values)})
        for m, row in rows:
            if m in refused or row.strategy_status is None or row.run_id is None:
                continue
            await conn.execute(
                update(Strategy)
                .where(and_(Strategy.id == row.strategy_id, Strategy.status == StrategyStatus.running,
                            Strategy.started_at == datetime.fromisoformat(row.run_id)))
                .values(status=StrategyStatus(row.strategy_status), stopped_at=func.now(),
                        failure_reason=row.failure_reason, updated_at=func.now()))
        return refused

    async def _dead(self, msg_id: str, raw: bytes, reason: str, partition: int = 0) -> None:
        stream = keys.order_logs_stream(partition)  # its dead stream shares the slot: one MULTI
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.order_logs_dead_stream(partition), {"row": raw, "reason": reason, "msg_id": msg_id},
                      maxlen=keys.DEAD_MAXLEN, approximate=True)
            pipe.xack(stream, keys.LOG_WRITERS_GROUP, msg_id)
            pipe.xdel(stream, msg_id)
            await pipe.execute()
        metrics.DEAD_LETTERS.labels(stream=keys.ORDER_LOGS_DEAD_STREAM).inc()
        self.log.error("order-log row dead-lettered", msg_id=msg_id, reason=reason)

    async def _update_lag(self, stream: str) -> None:
        with contextlib.suppress(RedisError):
            for group in await self.redis.xinfo_groups(stream):
                if as_text(group["name"]) == keys.LOG_WRITERS_GROUP:
                    metrics.WRITER_LAG.set(int(group.get("pending") or 0) + int(group.get("lag") or 0))


def _values(row: OrderLogRow, owner: UUID) -> dict[str, Any]:
    return {"id": row.id, "strategy_id": row.strategy_id, "user_id": row.user_id or owner,
            "event_type": row.event_type.value, "request_payload": row.request_payload,
            "response_payload": row.response_payload, "status": row.status.value, "created_at": row.created_at,
            "trading_day": row.trading_day, "broker_order_id": row.broker_order_id, "tag": row.tag,
            "stream_msg_id": row.stream_msg_id}


def _json(values: list[dict[str, Any]]) -> str:
    try:
        return orjson.dumps(values).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, which orjson refuses: the stdlib's encoder
        return json.dumps(values, default=str)
