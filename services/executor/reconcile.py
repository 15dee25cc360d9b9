"""Rebuild `runtime:{id}` of running strategies from the broker's order book.

Redis is not the last guard (appendfsync everysec can lose a second of
writes, a flush loses everything), so at start and whenever Redis lost state
the executor asks the broker, the truth about execution, before consuming.
Shares held = fills of the entry tag's orders minus fills of the exit tag's
(an order that ended CANCELLED/REJECTED after a partial fill counts what
filled): some held -> bought with `filled_quantity` = that; entry filled and
nothing left -> exited_by_sl/sold and the run is unloaded with an `exited`
log row; nothing filled -> none. Each change goes
out with its `position` control message in the same step. Running strategies
come from Postgres when it answers, otherwise from the loaded `strategy:*`
configs (Postgres down must not stop trading). Each strategy is rebuilt under
its lock, so no event of it is half-handled meanwhile. If `broker:{user_id}`
was lost too, it is restored from Postgres (same ciphertexts), since without
it no order can be placed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.broker.kite import BrokerError, api_key_fingerprint
from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.models import (
    ControlMessage,
    EventType,
    OrderLogRow,
    OrderLogStatus,
    Position,
    RuntimeState,
    StrategyConfig,
    StrategyStatus,
    order_log_id,
)
from libs.schema.tables import BrokerCredential, Strategy
from libs.service.logging import get_logger
from libs.service.outage import POSTGRES_UNAVAILABLE
from libs.service.redis_client import as_text, server_run_id
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import config_for, plan_run, unload_run
from libs.trading.tags import order_tag
from libs.trading.tokens import restore_broker_hash
from services.executor import metrics
from services.executor.credentials import CredentialStore, CredentialsUnavailable
from services.executor.placement import COMPLETE, TERMINAL, filled_quantity
from services.executor.state import LockTimeout, OrderState

RECONCILE_STREAM = "reconcile"  # namespace of row ids written by reconciliation
START = "start"  # the trigger of the reconciliation an executor runs before it first consumes
FORGET_BATCH = 1000

# Both scripts first check that `strategy:{id}` is this run or absent (lost with Redis): a
# stop + start during reconciliation loads a new run, which the old run's book must not touch.
# The rebuild is one step with its `position` message, as on the order path: a listener that
# loaded the run before the rebuild only learns a rebuilt `bought` from it (else its stop-loss
# goes unwatched).
_REBUILD = """
-- KEYS: [1] runtime:{id} (hash), [2] control:strategies (stream), [3] strategy:{id} (string)
-- ARGV: [1] runtime fields (JSON flat list), [2] `position` control JSON, [3] control MAXLEN, [4] run_id
-- Returns: 1 if rebuilt, 0 if another run is loaded (left alone)
local raw = redis.call('GET', KEYS[3])
if raw and cjson.decode(raw)['run_id'] ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], unpack(cjson.decode(ARGV[1])))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2])
return 1
"""

# The exited row goes to the order-log writer; the `position` message makes listeners drop the run.
_EXITED = """
-- KEYS: [1] queue:order_logs (stream), [2] control:strategies (stream), [3] strategy:{id} (string)
-- ARGV: [1] order-log row JSON, [2] `position` control JSON, [3] control MAXLEN, [4] run_id
-- Returns: 1 if this run is loaded (the caller unloads it), 2 if no run is loaded,
--          0 if another run is loaded (nothing written)
local raw = redis.call('GET', KEYS[3])
if raw and cjson.decode(raw)['run_id'] ~= ARGV[4] then return 0 end
redis.call('XADD', KEYS[1], '*', 'row', ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2])
if raw then return 1 end
return 2
"""


class Reconciler:
    """Rebuild runtime state of running strategies from the broker."""

    def __init__(self, redis: Redis, engine: AsyncEngine | None, credentials: CredentialStore, gateway: Any,
                 state: OrderState, calendar: MarketCalendar, *, pg_timeout_s: float,
                 on_configs: Callable[[Iterable[StrategyConfig]], None] | None = None) -> None:
        self.redis, self.engine, self.credentials, self.gateway = redis, engine, credentials, gateway
        self.state, self.calendar, self.pg_timeout_s = state, calendar, pg_timeout_s
        self.on_configs = on_configs  # told the running configs (the handler learns owners from them)
        self.log = get_logger("executor.reconcile")
        self._rebuild = redis.register_script(_REBUILD)
        self._exited_script = redis.register_script(_EXITED)

    async def run(self, trigger: str) -> int:
        """Reconcile every running strategy; return how many were rebuilt."""
        metrics.RECONCILES.labels(trigger=trigger).inc()
        # The server's identity before the rebuild: a Redis that restarted, failed over or
        # was flushed since the executors last reconciled may have lost writes, and with
        # a lost DEL an unsent-entry key would tell a BUY that was sent it never was.
        epoch = await server_run_id(self.redis)
        if trigger != START or as_text(await self.redis.get(keys.REDIS_EPOCH) or b"") != epoch:
            forgotten = await self._forget_unsent_entries()
            (self.log.warning if forgotten else self.log.info)(
                "redis may have lost writes: every entry not yet handled looks its tag up first", trigger=trigger,
                unsent_entries_forgotten=forgotten)
        configs = await self._running_configs()
        if self.on_configs is not None:
            self.on_configs(configs.values())
        by_user: dict[str, list[StrategyConfig]] = defaultdict(list)
        for config in configs.values():
            by_user[str(config.user_id)].append(config)
        results = await asyncio.gather(*(self._user(uid, cs) for uid, cs in by_user.items()))
        rebuilt = sum(results)
        self.log.info("runtime reconciled from the broker", trigger=trigger, strategies=len(configs),
                      rebuilt=rebuilt)
        await self.redis.set(keys.REDIS_EPOCH, epoch)
        self.state.trusted_identity = epoch
        return rebuilt

    async def _forget_unsent_entries(self) -> int:
        """Delete every `entry:unsent:*` key (each alone: a cluster spreads them over slots); return how many."""
        found = [key async for key in self.redis.scan_iter(match=keys.entry_unsent_pattern(), count=1000)]
        for start in range(0, len(found), FORGET_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in found[start:start + FORGET_BATCH]:
                    pipe.delete(key)
                await pipe.execute()
        return len(found)

    async def _running_configs(self) -> dict[str, StrategyConfig]:
        configs: dict[str, StrategyConfig] = {}
        try:
            configs.update(await asyncio.wait_for(self._from_postgres(), self.pg_timeout_s))
        except POSTGRES_UNAVAILABLE as error:
            self.log.warning("postgres unavailable for reconciliation; using loaded configs",
                             error=f"{type(error).__name__}: {error}")
        except RedisError:
            raise  # Redis is the caller's to wait out: it retries the whole reconciliation
        except Exception:  # a bug here must not leave loaded runs unreconciled
            self.log.exception("reading running strategies from postgres failed; using loaded configs")
        async for key in self.redis.scan_iter(match=keys.strategy_key_pattern(), count=1000):
            raw = await self.redis.get(key)
            if raw:
                loaded = StrategyConfig.model_validate_json(raw)
                configs[str(loaded.strategy_id)] = loaded
        return configs

    async def _from_postgres(self) -> dict[str, StrategyConfig]:
        if self.engine is None:
            return {}
        query = (
            select(Strategy.id, Strategy.user_id, Strategy.symbol, Strategy.buy_time, Strategy.sell_time,
                   Strategy.stop_loss, Strategy.quantity, Strategy.exchange, Strategy.product, Strategy.started_at,
                   BrokerCredential.api_key.label("cred_api_key"),
                   BrokerCredential.access_token.label("cred_access_token"),
                   BrokerCredential.api_key_fp, BrokerCredential.is_valid)
            .join(BrokerCredential, BrokerCredential.user_id == Strategy.user_id)
            .where(Strategy.status == StrategyStatus.running, Strategy.started_at.is_not(None)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        configs: dict[str, StrategyConfig] = {}
        for row in rows:
            await self._restore_credentials(row)
            configs[str(row.id)] = config_for(row, api_key_fp=row.api_key_fp)
        return configs

    async def _restore_credentials(self, cred: Any) -> None:
        if cred.cred_access_token:
            await restore_broker_hash(self.redis, cred.user_id, api_key=cred.cred_api_key, api_key_fp=cred.api_key_fp,
                                      is_valid=cred.is_valid, access_token=cred.cred_access_token)

    async def _user(self, user_id: str, configs: list[StrategyConfig]) -> int:
        try:
            creds = await self.credentials.get(user_id)
            book = await self.gateway.orders(creds.api_key, creds.access_token)
        except (BrokerError, CredentialsUnavailable) as error:
            self.log.error("cannot read the broker's book; runtime left as is", user_id=user_id, error=str(error))
            return 0
        by_tag: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for order in book:
            if order.get("tag"):
                by_tag[order["tag"]].append(order)
        rebuilt = 0
        fp = api_key_fingerprint(creds.api_key)
        for config in configs:
            if config.api_key_fp and config.api_key_fp != fp:
                # Another account's book says nothing about this run: it would read as `none`.
                self.log.error("broker account changed since start; runtime left as is",
                               strategy_id=str(config.strategy_id))
                continue
            try:
                async with self.state.strategy_lock(str(config.strategy_id)):
                    rebuilt += await self._strategy(config, by_tag)
            except LockTimeout:
                self.log.warning("strategy busy; not reconciled", strategy_id=str(config.strategy_id))
        return rebuilt

    async def _strategy(self, config: StrategyConfig, by_tag: dict[str, list[dict[str, Any]]]) -> int:
        sid = str(config.strategy_id)
        plan = plan_run(config, self.calendar, datetime.fromisoformat(config.run_id))
        entries = by_tag.get(order_tag(sid, config.run_id, plan.trading_day, "entry"), [])
        exits = by_tag.get(order_tag(sid, config.run_id, plan.trading_day, "exit"), [])
        bought, sold = _fills(entries), _fills(exits)
        entry = _filled(entries)
        exit_ = _filled(exits) if sold and sold >= bought else None
        if exits and exit_ is None:
            # An exit was sent but has not filled: whoever exits next must look it up first.
            await self.redis.set(keys.exit_attempt_key(sid, config.run_id), "1", ex=keys.RUN_MARKER_TTL_S)
        current = RuntimeState.from_redis_hash(await self.redis.hgetall(keys.runtime_key(sid)))
        now = datetime.now(UTC)
        if exit_ is not None:
            # The exit tag is shared, so the book cannot say SELL or STOPLOSS; the
            # listener's marker can (a guess by time would mislabel square-offs).
            by_sl = bool(await self.redis.exists(keys.stoploss_marker_key(sid, config.run_id)))
            position = Position.exited_by_sl if by_sl else Position.sold
            await self._exited(config, plan, exit_, position, now)
            return 1
        if entry is not None:
            held = bought - sold
            if (current.position == Position.bought and current.last_buy_order == entry["order_id"]
                    and current.filled_quantity == held):
                return 0
            fields = RuntimeState.hash_fields(position=Position.bought, last_buy_order=entry["order_id"],
                                              last_price=entry.get("average_price") or None, last_action="BUY",
                                              updated_at=now, filled_quantity=held)
        else:
            if current.position == Position.none:
                return 0
            fields = RuntimeState.hash_fields(position=Position.none, updated_at=now)
        flat = [x for pair in fields.items() for x in pair]
        control = keys.control_stream(keys.partition_of(sid))  # the strategy's partition: one slot
        if not await self._rebuild(keys=[keys.runtime_key(sid), control, keys.strategy_key(sid)],
                                   args=[dumps(flat), dumps(_position_message(config, Position(fields["position"]))),
                                         keys.CONTROL_MAXLEN, config.run_id]):
            self.log.warning("another run of the strategy was loaded meanwhile; not reconciled", strategy_id=sid,
                             run_id=config.run_id)
            return 0
        self.log.warning("runtime rebuilt from the broker", strategy_id=sid, position=fields["position"],
                         was=current.position.value, filled_quantity=fields.get("filled_quantity"))
        return 1

    async def _exited(self, config: StrategyConfig, plan: Any, order: dict[str, Any], position: Position,
                      now: datetime) -> None:
        sid = str(config.strategy_id)
        kind = EventType.STOPLOSS if position == Position.exited_by_sl else EventType.SELL
        row = OrderLogRow(
            id=order_log_id(RECONCILE_STREAM, str(order["order_id"])), strategy_id=config.strategy_id,
            user_id=config.user_id, event_type=kind, request_payload={"reconciled": True},
            response_payload={"order_id": order["order_id"], "status": order.get("status") or COMPLETE,
                              "average_price": order.get("average_price"), "found_by_tag": True,
                              "filled_quantity": filled_quantity(order)},
            status=OrderLogStatus.success, trading_day=plan.trading_day, broker_order_id=str(order["order_id"]),
            tag=order.get("tag"), created_at=now, run_id=config.run_id, strategy_status="exited")
        loaded = await self._exited_script(
            keys=[keys.order_logs_stream(keys.partition_of(sid)), keys.control_stream(keys.partition_of(sid)),
                  keys.strategy_key(sid)],
            args=[dumps(row), dumps(_position_message(config, position)), keys.CONTROL_MAXLEN, config.run_id])
        if not loaded:
            self.log.warning("another run of the strategy was loaded meanwhile; not reconciled", strategy_id=sid,
                             run_id=config.run_id)
            return
        if loaded == 1:
            # Under the lock and still this run: no stop (it takes the lock) or start
            # (it needs the key gone) can come in between.
            await unload_run(self.redis, config, plan)
        self.log.warning("run found exited at the broker; unloaded", strategy_id=sid, position=position.value)


def _position_message(config: StrategyConfig, position: Position) -> ControlMessage:
    return ControlMessage(action="position", strategy_id=config.strategy_id, symbol=config.symbol,
                          stop_loss=config.stop_loss, position=position, run_id=config.run_id)


def _filled(orders: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the latest order that filled some (COMPLETE, or ended after a partial fill)."""
    done = [o for o in orders if o.get("status") in TERMINAL and filled_quantity(o) > 0]
    return done[-1] if done else None


def _fills(orders: list[dict[str, Any]]) -> int:
    return sum(filled_quantity(o) for o in orders)

