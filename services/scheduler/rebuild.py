"""Rebuild the schedule of running strategies from Postgres (start, Redis restart).

Postgres holds intent (which strategies run, since when: `started_at` is the
run), so the BUY/SELL of every running run can be recomputed with `plan_run`.
Per running strategy:

- not loaded in Redis (lost with a flush or a crash): restore `broker:{user}`
  if missing, then `load_run` (runtime position none; the executor reconciles
  positions from the broker by tag). A BUY due less than `grace_s` ago fires at
  once. A BUY due longer ago is missed: the strategy is failed with the reason,
  loudly, unless `order_logs` shows the entry order already reached the broker
  (then the run is loaded without its BUY, so its SELL, even a late one, still
  gets us out: getting out late beats staying in), or shows the exit order too
  (the run is over; the order-log writer closes it in Postgres).
- loaded: re-add (ZADD, idempotent: members are canonical JSON) the members
  still ahead of now that the position needs (none: BUY and SELL, bought: SELL).
  A past-due member that is absent was already moved to queue:orders and may be
  in flight, so it is never re-added: that would enqueue it twice.

`sweep_stale_buys` runs first, on Redis alone: a BUY still in `schedule` more
than `grace_s` after its due time means no scheduler ran; it is taken out
(ZREM decides which replica owns it) and its run unloaded, so the Postgres pass
finds it unloaded and past grace and fails it with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import Counter
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from libs.schema import keys
from libs.schema.codec import loads
from libs.schema.models import Position, RuntimeState, StrategyStatus, event_to_json
from libs.schema.tables import BrokerCredential, Strategy
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import RunPlan, config_for, load_run, loaded_config, plan_run, unload_run
from libs.trading.tags import order_tag
from libs.trading.tokens import restore_broker_hash

# A lazy proxy: configure_logging() runs in main(), after this module is imported, and a
# bound logger made now would keep structlog's default (console) configuration.
log = structlog.get_logger("scheduler.rebuild")

MISSED = Counter("scheduler_missed_events_total", "BUY events found past the grace window: strategy failed.")

_SENT_TAGS = text(
    "SELECT DISTINCT tag FROM order_logs WHERE strategy_id = :sid AND tag IN (:entry, :exit)"
    " AND broker_order_id IS NOT NULL"
)


@dataclass
class RebuildReport:
    """What one rebuild did."""

    running: int = 0
    loaded: int = 0
    readded: int = 0
    failed: list[str] = field(default_factory=list)
    broker_restored: int = 0


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def sweep_stale_buys(redis: Redis, calendar: MarketCalendar, grace_s: float) -> int:
    """Take BUYs past the grace window out of every partition's `schedule` and unload their runs; return how many."""
    count = 0
    for partition in range(keys.partition_count()):
        count += await _sweep_partition(redis, calendar, grace_s, keys.schedule_key(partition))
    return count


async def _sweep_partition(redis: Redis, calendar: MarketCalendar, grace_s: float, schedule: str) -> int:
    cutoff = int(time.time() * 1000 - grace_s * 1000)
    stale = await redis.zrangebyscore(schedule, "-inf", f"({cutoff}", withscores=True)
    count = 0
    for member, score in stale:
        try:
            event = loads(member)
        except ValueError:
            continue
        if event.get("event_type") != "BUY" or not await redis.zrem(schedule, member):
            continue
        count += 1
        MISSED.inc()
        log.error("missed buy taken out of schedule", strategy_id=event.get("strategy_id"), event_type="BUY",
                  due=datetime.fromtimestamp(score / 1000, UTC).isoformat(), grace_s=grace_s)
        config = await loaded_config(redis, event["strategy_id"])
        if config is not None and config.run_id == event.get("run_id"):
            started_at = datetime.fromisoformat(config.run_id)
            await unload_run(redis, config, plan_run(config, calendar, started_at))
    return count


async def fail_missed_run(conn: AsyncConnection, redis: Redis, row: Strategy, plan: RunPlan, config: Any,
                          reason: str) -> bool:
    """Mark the run failed in Postgres (only if still this running run) and unload it.

    `conn` is the caller's transaction holding the row lock; it commits the update.
    """
    result = await conn.execute(
        update(Strategy)
        .where(Strategy.id == row.id, Strategy.status == StrategyStatus.running,
               Strategy.started_at == row.started_at)
        .values(status=StrategyStatus.failed, stopped_at=datetime.now(UTC), failure_reason=reason,
                updated_at=datetime.now(UTC))
    )
    await unload_run(redis, config, plan)
    MISSED.inc()
    log.error("strategy failed: missed event", strategy_id=str(row.id), event_type="BUY", reason=reason,
              updated=result.rowcount)
    return bool(result.rowcount)


async def rebuild_schedule(engine: AsyncEngine, redis: Redis, calendar: MarketCalendar, *,
                           grace_s: float) -> RebuildReport:
    """Bring `schedule` and `strategy:{id}` in line with the running strategies in Postgres."""
    await sweep_stale_buys(redis, calendar, grace_s)
    report = RebuildReport()
    async with AsyncSession(engine) as session:
        rows = (await session.execute(
            select(Strategy, BrokerCredential)
            .outerjoin(BrokerCredential, BrokerCredential.user_id == Strategy.user_id)
            .where(Strategy.status == StrategyStatus.running, Strategy.started_at.is_not(None))
        )).all()
    report.running = len(rows)
    for row, cred in rows:
        try:
            await _rebuild_one(engine, redis, calendar, row, cred, grace_s, report)
        except (SQLAlchemyError, RedisError, OSError):
            raise  # an outage: the caller retries the whole rebuild
        except Exception:  # one odd row must not stop the others from being rebuilt
            log.exception("strategy not rebuilt", strategy_id=str(row.id))
    log.info("schedule rebuilt", running=report.running, loaded=report.loaded, readded=report.readded,
             failed=len(report.failed), broker_restored=report.broker_restored)
    return report


async def _rebuild_one(engine: AsyncEngine, redis: Redis, calendar: MarketCalendar, row: Strategy,
                       cred: BrokerCredential | None, grace_s: float, report: RebuildReport) -> None:
    """Rebuild one running strategy's Redis state, holding its row lock.

    The rows were read in one snapshot, possibly long before this one's turn:
    a stop (or a stop and a new start) may have come since. The API stops and
    starts under the same row lock, so re-checking the run under it means a
    stopped run is never loaded back (its BUY would reach the broker).
    """
    config = config_for(row, api_key_fp=cred.api_key_fp if cred else None)
    plan = plan_run(config, calendar, row.started_at)
    async with engine.begin() as conn:
        still = await conn.scalar(
            select(Strategy.id).where(Strategy.id == row.id, Strategy.status == StrategyStatus.running,
                                      Strategy.started_at == row.started_at).with_for_update())
        if still is None:
            log.info("run stopped or restarted since the snapshot; not rebuilt", strategy_id=str(row.id),
                     run_id=config.run_id)
            return
        if cred is not None and await restore_broker_hash(
                redis, cred.user_id, api_key=cred.api_key, api_key_fp=cred.api_key_fp, is_valid=cred.is_valid,
                access_token=cred.access_token):
            report.broker_restored += 1
        current = await loaded_config(redis, str(row.id))
        if current is None:
            await _load_missing(conn, redis, row, config, plan, grace_s, report)
        elif current.run_id != config.run_id:
            log.warning("loaded run differs from Postgres; left alone", strategy_id=str(row.id),
                        loaded_run=current.run_id, run_id=config.run_id)
        else:
            await _readd_ahead(redis, row, plan, report)


async def _load_missing(conn: AsyncConnection, redis: Redis, row: Strategy, config: Any,
                        plan: RunPlan, grace_s: float, report: RebuildReport) -> None:
    now_ms = time.time() * 1000
    sid = str(row.id)
    if plan.buy_due_ms >= now_ms - grace_s * 1000:
        await load_run(redis, config, plan)
        report.loaded += 1
        if plan.buy_due_ms < now_ms:
            log.warning("late buy fired within grace", strategy_id=sid, event_type="BUY",
                        late_s=round((now_ms - plan.buy_due_ms) / 1000, 3))
        return
    entry_tag = order_tag(row.id, config.run_id, plan.trading_day, "entry")
    exit_tag = order_tag(row.id, config.run_id, plan.trading_day, "exit")
    sent = set((await conn.execute(_SENT_TAGS, {"sid": row.id, "entry": entry_tag, "exit": exit_tag})).scalars())
    if exit_tag in sent:
        # The run already exited at the broker; the order-log writer will close it in Postgres.
        log.warning("run already exited at the broker; not reloaded", strategy_id=sid, tag=exit_tag)
        return
    if entry_tag in sent:
        # The entry reached the broker before Redis lost the run: keep only the exit. Keep the
        # runtime too if the executor already rebuilt it from the broker's book (bought): a fresh
        # `none` would hide the position from the listener, and its stop-loss would go unwatched.
        await load_run(redis, config, plan, runtime=await _surviving_runtime(redis, sid))
        await redis.zrem(keys.schedule_key(keys.partition_of(sid)), event_to_json(plan.buy))
        report.loaded += 1
        log.warning("run reloaded after its entry; exit scheduled", strategy_id=sid, event_type="SELL",
                    tag=entry_tag, late=plan.sell_due_ms < now_ms)
        return
    due = plan.buy.trigger_time.isoformat() if plan.buy.trigger_time else "?"
    reason = f"missed buy_time {due}: no scheduler ran within {grace_s:g}s of it"
    await fail_missed_run(conn, redis, row, plan, config, reason)
    report.failed.append(sid)


async def _surviving_runtime(redis: Redis, sid: str) -> RuntimeState | None:
    raw = await redis.hgetall(keys.runtime_key(sid))
    try:
        return RuntimeState.from_redis_hash(raw) if raw else None
    except ValidationError:
        log.warning("unreadable runtime replaced", strategy_id=sid)
        return None


async def _readd_ahead(redis: Redis, row: Strategy, plan: RunPlan, report: RebuildReport) -> None:
    raw = await redis.hget(keys.runtime_key(row.id), "position")
    schedule = keys.schedule_key(keys.partition_of(row.id))
    position = raw.decode() if raw else Position.none.value
    wanted = []
    if position == Position.none.value:
        wanted = [(plan.buy, plan.buy_due_ms), (plan.sell, plan.sell_due_ms)]
    elif position == Position.bought.value:
        wanted = [(plan.sell, plan.sell_due_ms)]
        if await redis.zscore(schedule, event_to_json(plan.sell)) is not None and \
                plan.sell_due_ms < time.time() * 1000:
            log.warning("missed sell fired late while bought", strategy_id=str(row.id), event_type="SELL")
    now_ms = time.time() * 1000
    ahead = {event_to_json(event): due for event, due in wanted if due > now_ms}
    if ahead:
        report.readded += await redis.zadd(schedule, ahead, nx=True)
