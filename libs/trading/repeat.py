"""Re-arm repeating strategies for their next trading day.

A strategy with repeat `trading_days` ends each run like a one-off: the order-log
writer records `exited` (or `failed`: a day it could not buy, an expired Kite
session). The scheduler then starts its next run exactly as the API's start
does: a fresh `started_at` (the run id, hence fresh order tags), planned on the
next trading day (and allowed weekday) whose buy_time is still ahead, loaded into
Redis before the Postgres commit. Holidays need nothing special: the plan skips them.

Safety first:
- a run is re-armed only once its previous run has left Redis (`strategy:{id}`
  gone), so the executor's unload of the old run can never remove the new one;
- a failed run whose entry filled at the broker with no exit filled (per the
  order log, by the run's tags) may still hold a position: it is not re-armed,
  and its failure_reason says so, until the user looks and starts it again;
- replicas race on `SELECT ... FOR UPDATE SKIP LOCKED` plus a status guard, so
  one run is armed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from uuid import UUID

from redis.asyncio import Redis
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.schema import keys
from libs.schema.models import OrderLogStatus, StrategyStatus
from libs.schema.tables import BrokerCredential, OrderLog, Strategy
from libs.service.logging import get_logger
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import commit_loaded_run, config_for, plan_run
from libs.trading.tags import order_tag

REPEATING = "trading_days"
NOT_REARMED = "not re-armed: "

log = get_logger("repeat")


@dataclass(frozen=True)
class Rearmed:
    """One strategy armed for its next trading day."""

    strategy_id: UUID
    run_id: str
    trading_day: date


async def may_hold_position(session: AsyncSession, row: Strategy, calendar: MarketCalendar) -> bool:
    """Tell whether the row's last run filled its entry and no exit (per the order log)."""
    if row.started_at is None:
        return False
    plan = plan_run(config_for(row), calendar, row.started_at)
    entry = order_tag(row.id, plan.buy.run_id, plan.trading_day, "entry")
    exit_ = order_tag(row.id, plan.buy.run_id, plan.trading_day, "exit")
    filled = (await session.execute(
        select(OrderLog.tag, func.count()).where(OrderLog.strategy_id == row.id, OrderLog.tag.in_([entry, exit_]),
                                                 OrderLog.status == OrderLogStatus.success)
        .group_by(OrderLog.tag))).all()
    tags = {tag for tag, _ in filled}
    return entry in tags and exit_ not in tags


async def rearm_ended_runs(sessions: async_sessionmaker[AsyncSession], redis: Redis, calendar: MarketCalendar,
                           now: datetime, *, limit: int = 200) -> list[Rearmed]:
    """Arm every repeating strategy whose run ended for its next trading day; return them."""
    armed: list[Rearmed] = []
    async with sessions() as session:
        ids = (await session.scalars(
            select(Strategy.id).where(Strategy.repeat == REPEATING, Strategy.deleted_at.is_(None),
                                      Strategy.status.in_([StrategyStatus.exited, StrategyStatus.failed]),
                                      func.coalesce(Strategy.failure_reason, "").not_like(NOT_REARMED + "%"))
            .limit(limit))).all()
    for sid in ids:
        result = await _rearm_one(sessions, redis, calendar, sid, now)
        if result is not None:
            armed.append(result)
    return armed


async def end_series(session: AsyncSession, user_id: UUID, strategy_id: UUID | None = None) -> list[UUID]:
    """Mark the user's repeating strategies between runs (exited/failed) `stopped`, so none is re-armed.

    One strategy, or all of the user's with strategy_id None. Commits; returns the ids.
    A re-arm holding a row's lock finishes first: that row is `running` then and
    is the caller's to stop like any running one.
    """
    stmt = (update(Strategy)
            .where(Strategy.user_id == user_id, Strategy.repeat == REPEATING,
                   Strategy.status.in_([StrategyStatus.exited, StrategyStatus.failed]))
            .values(status=StrategyStatus.stopped, stopped_at=func.now(), updated_at=func.now())
            .returning(Strategy.id))
    if strategy_id is not None:
        stmt = stmt.where(Strategy.id == strategy_id)
    ids = list((await session.scalars(stmt)).all())
    await session.commit()
    if ids:
        log.info("repeating strategies stopped between runs", user_id=str(user_id), count=len(ids))
    return ids


async def _rearm_one(sessions: async_sessionmaker[AsyncSession], redis: Redis, calendar: MarketCalendar,
                     sid: UUID, now: datetime) -> Rearmed | None:
    async with sessions() as session:
        row = await session.scalar(
            select(Strategy).where(Strategy.id == sid, Strategy.repeat == REPEATING, Strategy.deleted_at.is_(None),
                                   Strategy.status.in_([StrategyStatus.exited, StrategyStatus.failed]))
            .with_for_update(skip_locked=True).execution_options(populate_existing=True))
        if row is None:
            return None  # another replica has it, or it changed meanwhile
        if await redis.exists(keys.strategy_key(sid)):
            return None  # the previous run is still being unloaded (or squared off): next pass
        if row.status == StrategyStatus.failed and await may_hold_position(session, row, calendar):
            row.failure_reason = (NOT_REARMED + "the last run may hold a position (its entry filled, no exit "
                                  "did): check Kite, square off if needed, then start it again. "
                                  + (row.failure_reason or ""))[:2000]
            await session.commit()
            log.error("repeating strategy not re-armed: a position may be open", strategy_id=str(sid))
            return None
        fp = await session.scalar(select(BrokerCredential.api_key_fp)
                                  .where(BrokerCredential.user_id == row.user_id))
        previous = row.status
        row.status, row.started_at, row.stopped_at, row.failure_reason = StrategyStatus.running, now, None, None
        await session.flush()
        config = config_for(row, api_key_fp=fp)
        plan = plan_run(config, calendar, now)
        await commit_loaded_run(session, redis, config, plan, now=now)
    log.info("strategy re-armed", strategy_id=str(sid), run_id=config.run_id, after=previous.value,
             trading_day=plan.trading_day.isoformat(), buy_due_ms=plan.buy_due_ms)
    return Rearmed(sid, config.run_id, plan.trading_day)
