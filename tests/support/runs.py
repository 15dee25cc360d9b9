"""One started strategy run as tests hold it, and the reads every test of a run makes.

`Run` serves the executor's tests (with the simulator account it trades on)
and the pipeline's (with the Postgres row it was inserted as). `position_is`
and `status_is` are the conditions tests wait on with `eventually`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from libs.schema import keys
from libs.schema.models import (
    BuyEvent,
    Position,
    RuntimeState,
    SellEvent,
    StoplossEvent,
    StrategyConfig,
    StrategyStatus,
)
from libs.schema.tables import Strategy
from libs.trading.runs import RunPlan
from libs.trading.tags import order_tag


def engine_for(database_url: str) -> AsyncEngine:
    """Return a small async engine for the test database."""
    return create_async_engine(database_url, pool_size=2)


@dataclass(frozen=True)
class Account:
    """A simulator account registered as a Tickwise user."""

    user_id: uuid.UUID
    api_key: str
    access_token: str
    api_key_fp: str


@dataclass(frozen=True)
class Run:
    """A started strategy: its Redis config and plan, and the account or row it came from."""

    config: StrategyConfig
    plan: RunPlan
    account: Account | None = None
    row: Strategy | None = None

    @property
    def sid(self) -> str:
        return str(self.config.strategy_id)

    @property
    def id(self) -> str:
        return self.sid

    def tag(self, intent: str) -> str:
        return order_tag(self.config.strategy_id, self.config.run_id, self.plan.trading_day, intent)  # type: ignore[arg-type]

    def buy(self, **extra: Any) -> BuyEvent:
        return self.plan.buy.model_copy(update=extra)

    def sell(self, **extra: Any) -> SellEvent:
        return self.plan.sell.model_copy(update=extra)

    def stoploss(self, price: float = 1.0) -> StoplossEvent:
        return StoplossEvent(strategy_id=self.config.strategy_id, run_id=self.config.run_id,
                             trading_day=self.plan.trading_day, trigger_price=price)


async def runtime(redis: Redis, run: Run) -> RuntimeState:
    """Return the run's `runtime:{id}` hash, parsed."""
    return RuntimeState.from_redis_hash(await redis.hgetall(keys.runtime_key(run.sid)))


async def strategy_row(engine: AsyncEngine, run: Run) -> Any:
    """Return the run's strategy row as Postgres holds it now."""
    async with engine.connect() as conn:
        return (await conn.execute(select(Strategy).where(Strategy.id == run.config.strategy_id))).one()


async def position_is(redis: Redis, run: Run, position: Position) -> bool:
    """Return whether the run's runtime shows `position` (a condition for `eventually`)."""
    return (await runtime(redis, run)).position == position


async def status_is(engine: AsyncEngine, run: Run, status: StrategyStatus) -> bool:
    """Return whether the run's strategy row has `status` (a condition for `eventually`)."""
    return (await strategy_row(engine, run)).status == status
