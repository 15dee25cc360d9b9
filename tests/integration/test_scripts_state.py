"""Every script of the strategy lock, the executor's order path and the API's run control, run directly.

Each script is registered on a real Redis and called with the keys and
arguments its caller passes, on its edge cases: the lock held by another
owner or expired, a release or renewal by someone who lost the lock, a commit
after the lock was lost, a dead letter with and without its run loaded, an
entry pending or not. `runtime:{id}.lock_state` is checked wherever a script
takes, renews or releases the lock.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from libs.schema import keys
from libs.schema.codec import dumps
from libs.schema.models import (
    AbortEvent,
    BuyEvent,
    Position,
    RetryEvent,
    RuntimeState,
    SellEvent,
    StrategyConfig,
    event_to_json,
)
from libs.trading import lock as lock_module
from libs.trading.calendar import MarketCalendar
from libs.trading.runs import load_run, plan_run, run_id_for
from services.api import run_control
from services.executor import state as state_module
from tests.support.eventually import eventually

CAL = MarketCalendar("always_open")
GROUP = keys.EXECUTORS_GROUP


class Strategy:
    """One strategy's keys, and a loaded run of it when asked."""

    def __init__(self) -> None:
        self.sid = str(uuid.uuid4())
        self.uid = uuid.uuid4()
        self.part = keys.partition_of(self.sid)
        self.lock, self.runtime = keys.lock_key(self.sid), keys.runtime_key(self.sid)
        self.config = StrategyConfig(strategy_id=self.sid, user_id=self.uid, symbol="INFY", buy_time="09:30:00",
                                     sell_time="15:00:00", stop_loss=1500.0, quantity=2, status="running",
                                     run_id=run_id_for(datetime.now(UTC)), api_key_fp="fp")
        self.plan = plan_run(self.config, CAL, datetime.fromisoformat(self.config.run_id))
        self.run_id = self.config.run_id
        self.orders = keys.orders_stream(self.part)

    async def load(self, redis: Redis, position: Position = Position.none) -> None:
        await load_run(redis, self.config, self.plan)
        await redis.hset(self.runtime, "position", position.value)

    async def held_by(self, redis: Redis, owner: str, px: int = 5000) -> None:
        """Give the lock to `owner`, as its take would have: the loaded runtime reads `locked`."""
        await redis.set(self.lock, owner, px=px)
        await redis.hset(self.runtime, "lock_state", "locked")

    async def lock_state(self, redis: Redis) -> bytes | None:
        return await redis.hget(self.runtime, "lock_state")

    def buy(self, **extra: Any) -> bytes:
        return event_to_json(BuyEvent(strategy_id=self.sid, run_id=self.run_id, trading_day=self.plan.trading_day,
                                      **extra))

    async def delivered(self, redis: Redis, raw: bytes) -> str:
        """XADD an event to the partition's stream and read it as a consumer: pending, not acked."""
        await redis.xgroup_create(self.orders, GROUP, id="0", mkstream=True)
        await redis.xadd(self.orders, {"event": raw})
        reply = await redis.xreadgroup(GROUP, "c1", {self.orders: ">"}, count=1)
        return reply[0][1][0][0].decode()


@pytest.fixture
def s() -> Strategy:
    return Strategy()


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


# --- libs.trading.lock ---------------------------------------------------------------------------

async def test_acquire_takes_a_free_lock_and_marks_the_runtime_locked(redis: Redis, s: Strategy) -> None:
    acquire = redis.register_script(lock_module.ACQUIRE)
    await s.load(redis)
    assert await s.lock_state(redis) == b"free"
    assert await acquire(keys=[s.lock, s.runtime], args=["me", 5000]) == 1
    assert await redis.get(s.lock) == b"me" and 0 < await redis.pttl(s.lock) <= 5000
    assert await s.lock_state(redis) == b"locked"


async def test_acquire_refuses_a_lock_held_by_another_owner(redis: Redis, s: Strategy) -> None:
    acquire = redis.register_script(lock_module.ACQUIRE)
    await s.load(redis)
    await redis.set(s.lock, "other", px=5000)
    assert await acquire(keys=[s.lock, s.runtime], args=["me", 5000]) == 0
    assert await redis.get(s.lock) == b"other"
    assert await s.lock_state(redis) == b"free"  # untouched: the refusing script writes nothing


async def test_acquire_takes_an_expired_lock(redis: Redis, s: Strategy) -> None:
    acquire = redis.register_script(lock_module.ACQUIRE)
    await redis.set(s.lock, "crashed-holder", px=20)
    await eventually(lambda: _gone(redis, s.lock), timeout=5)
    assert await acquire(keys=[s.lock, s.runtime], args=["me", 5000]) == 1
    assert await redis.get(s.lock) == b"me"


async def test_acquire_never_creates_the_runtime_of_an_unloaded_run(redis: Redis, s: Strategy) -> None:
    acquire = redis.register_script(lock_module.ACQUIRE)
    release = redis.register_script(lock_module.RELEASE)
    assert await acquire(keys=[s.lock, s.runtime], args=["me", 5000]) == 1
    assert await release(keys=[s.lock, s.runtime], args=["me"]) == 1
    assert not await redis.exists(s.runtime)


async def test_renew_extends_only_its_own_lock_and_leaves_lock_state_alone(redis: Redis, s: Strategy) -> None:
    renew = redis.register_script(lock_module.RENEW)
    await s.load(redis)
    await s.held_by(redis, "me", px=100)
    assert await renew(keys=[s.lock], args=["me", 60_000]) == 1
    assert await redis.pttl(s.lock) > 10_000
    assert await s.lock_state(redis) == b"locked"
    await redis.hset(s.runtime, "lock_state", "free")
    assert await renew(keys=[s.lock], args=["me", 60_000]) == 1
    assert await s.lock_state(redis) == b"free"  # renewal never flips it


async def test_renew_of_a_lost_lock_fails_and_changes_nothing(redis: Redis, s: Strategy) -> None:
    renew = redis.register_script(lock_module.RENEW)
    await redis.set(s.lock, "other", px=5000)
    assert await renew(keys=[s.lock], args=["me", 60_000]) == 0
    assert await redis.pttl(s.lock) <= 5000 and await redis.get(s.lock) == b"other"
    await redis.delete(s.lock)  # expired: renewal must not bring it back
    assert await renew(keys=[s.lock], args=["me", 60_000]) == 0
    assert not await redis.exists(s.lock)


async def test_release_by_its_owner_frees_the_lock_and_the_runtime(redis: Redis, s: Strategy) -> None:
    release = redis.register_script(lock_module.RELEASE)
    await s.load(redis)
    await s.held_by(redis, "me")
    assert await release(keys=[s.lock, s.runtime], args=["me"]) == 1
    assert not await redis.exists(s.lock)
    assert await s.lock_state(redis) == b"free"


async def test_release_by_a_non_owner_leaves_the_lock_and_lock_state(redis: Redis, s: Strategy) -> None:
    release = redis.register_script(lock_module.RELEASE)
    await s.load(redis)
    await s.held_by(redis, "other")
    assert await release(keys=[s.lock, s.runtime], args=["me"]) == 0
    assert await release(keys=[s.lock, s.runtime], args=[""]) == 0
    assert await redis.get(s.lock) == b"other"
    assert await s.lock_state(redis) == b"locked"
    await redis.delete(s.lock)
    assert await release(keys=[s.lock, s.runtime], args=["me"]) == 0  # expired: nothing to release


@pytest.mark.parametrize("held", [True, False])
async def test_a_run_loaded_while_the_lock_is_held_reads_locked(redis: Redis, s: Strategy, held: bool) -> None:
    if held:
        await redis.set(s.lock, "executor", px=5000)
    await load_run(redis, s.config, s.plan)
    assert await s.lock_state(redis) == (b"locked" if held else b"free")


# --- services.executor.state ---------------------------------------------------------------------

def _lock_read_args(s: Strategy, token: str = "me", creds: bool = False, slot: list[Any] | None = None,
                    entry: bool = False, identity: str = "") -> list:
    return [token, 5000, "1" if creds else "0", s.run_id, "1" if entry else "0", identity, *(slot or [])]


def _lock_read_keys(s: Strategy, intent: str | None = None, creds: bool = False, rate: bool = False,
                    entry: bool = False) -> list[str]:
    marker = (keys.entry_unsent_key if entry else keys.exit_attempt_key)(s.sid, s.run_id)
    out = [s.lock, s.runtime, keys.strategy_key(s.sid), marker, intent or marker]
    if creds:
        out.append(keys.broker_credentials_key(s.uid))
    if rate:
        out.append(keys.order_rate_key("fp"))
    return out


async def test_lock_read_answers_nil_and_reads_nothing_while_another_owner_holds_it(redis: Redis,
                                                                                   s: Strategy) -> None:
    lock_read = redis.register_script(state_module._LOCK_READ)
    await s.load(redis, Position.bought)
    await redis.set(s.lock, "other", px=5000)
    reply = await lock_read(keys=_lock_read_keys(s, rate=True), args=_lock_read_args(s, slot=[10, 1000, "m", 60]))
    assert reply is None
    assert await redis.get(s.lock) == b"other" and await s.lock_state(redis) == b"free"
    assert not await redis.exists(keys.order_rate_key("fp"), keys.exit_attempt_key(s.sid, s.run_id))


async def test_lock_read_takes_the_lock_and_returns_config_runtime_credentials(redis: Redis, s: Strategy) -> None:
    lock_read = redis.register_script(state_module._LOCK_READ)
    await s.load(redis)
    await redis.hset(keys.broker_credentials_key(s.uid), mapping={"api_key": "ct", "is_valid": "1"})
    intent = keys.stoploss_marker_key(s.sid, s.run_id)
    await redis.set(intent, "1")
    config, runtime, marker, creds, slot, intent_set = await lock_read(
        keys=_lock_read_keys(s, intent, creds=True), args=_lock_read_args(s, creds=True))
    assert StrategyConfig.model_validate_json(config) == s.config
    runtime = dict(zip(runtime[::2], runtime[1::2], strict=True))
    assert runtime[b"position"] == b"none" and runtime[b"lock_state"] == b"locked"  # read after taking
    assert (marker, slot, intent_set) == (0, -1, 1)
    assert dict(zip(creds[::2], creds[1::2], strict=True)) == {b"api_key": b"ct", b"is_valid": b"1"}
    assert await redis.get(s.lock) == b"me"


async def test_lock_read_of_an_unloaded_run_takes_the_lock_only(redis: Redis, s: Strategy) -> None:
    lock_read = redis.register_script(state_module._LOCK_READ)
    config, runtime, marker, creds, slot, intent_set = await lock_read(keys=_lock_read_keys(s),
                                                                       args=_lock_read_args(s))
    assert (config, runtime, marker, creds, slot, intent_set) == (None, [], 0, None, -1, 0)
    assert not await redis.exists(s.runtime)


async def test_lock_read_takes_an_order_slot_only_for_a_plain_exit(redis: Redis, s: Strategy) -> None:
    lock_read = redis.register_script(state_module._LOCK_READ)
    release = redis.register_script(lock_module.RELEASE)
    marker = keys.exit_attempt_key(s.sid, s.run_id)
    slot_args = [10, 1000, "m", 60]

    async def slot(run_id: str | None = None) -> int:
        args = _lock_read_args(s, slot=slot_args)
        args[3] = run_id or s.run_id
        reply = await lock_read(keys=_lock_read_keys(s, rate=True), args=args)
        await release(keys=[s.lock, s.runtime], args=["me"])
        return reply[4]

    await s.load(redis, Position.none)
    assert await slot() == -1  # no position: not an exit that may send without a lookup
    await redis.hset(s.runtime, "position", Position.bought.value)
    assert await slot("another-run") == -1
    assert not await redis.exists(marker, keys.order_rate_key("fp"))
    assert await slot() == 0  # bought, this run, no earlier attempt: slot taken and the exit marked
    assert await redis.exists(marker) and await redis.zcard(keys.order_rate_key("fp")) == 1
    assert await slot() == -1  # an earlier exit attempt: the exit looks its tag up first


async def test_lock_read_of_an_entry_reads_no_exit_marker_and_takes_no_slot_unless_unsent(
        redis: Redis, s: Strategy) -> None:
    lock_read = redis.register_script(state_module._LOCK_READ)
    release = redis.register_script(lock_module.RELEASE)
    marker, intent = keys.exit_attempt_key(s.sid, s.run_id), keys.stoploss_marker_key(s.sid, s.run_id)
    unsent = keys.entry_unsent_key(s.sid, s.run_id)
    server = str((await redis.info("server"))["run_id"])

    async def entry_read(identity: str) -> tuple[int, int, int]:
        reply = await lock_read(keys=_lock_read_keys(s, intent, rate=True, entry=True),
                                args=_lock_read_args(s, slot=[10, 1000, "m", 60], entry=True, identity=identity))
        await release(keys=[s.lock, s.runtime], args=["me"])
        return reply[2], reply[4], reply[5]

    await s.load(redis, Position.bought)
    await redis.set(intent, "1")
    # Bought, no exit attempt, a slot asked for: as an exit it would take one; an entry does not.
    assert await entry_read(server) == (0, -1, 0)
    assert not await redis.exists(marker, keys.order_rate_key("fp"))
    # Unsent, but on a server other than the trusted one: deleted, answered 2, no slot.
    await s.load(redis, Position.none)
    await redis.set(unsent, "1")
    assert await entry_read("run_id of another server") == (2, -1, 0)
    assert not await redis.exists(unsent, keys.order_rate_key("fp"))
    # Unsent on the trusted server (one of a cluster's primaries listed): deleted, slot taken.
    await redis.set(unsent, "1")
    assert await entry_read(f"a:1=other,b:2={server}") == (1, 0, 0)
    assert (await redis.exists(unsent), await redis.zcard(keys.order_rate_key("fp"))) == (0, 1)
    assert await entry_read(server) == (0, -1, 0)  # gone: a later entry looks its tag up first


async def test_lock_read_answers_the_wait_when_the_rate_is_used_up(redis: Redis, s: Strategy) -> None:
    lock_read = redis.register_script(state_module._LOCK_READ)
    await s.load(redis, Position.bought)
    await redis.zadd(keys.order_rate_key("fp"), {f"{i}:x": (await redis.time())[0] * 1000 for i in range(2)})
    reply = await lock_read(keys=_lock_read_keys(s, rate=True), args=_lock_read_args(s, slot=[2, 60_000, "m", 60]))
    assert reply[4] > 0 and not await redis.exists(keys.exit_attempt_key(s.sid, s.run_id))


def _commit_args(s: Strategy, *, runtime: dict[str, str] | None = None, control: bytes = b"",
                 abort: bytes = b"", ack: str = "", token: str = "", notice: bytes = b"",
                 run_id: str | None = None) -> list[Any]:
    flat = [x for pair in (runtime or {}).items() for x in pair]
    return [run_id or s.run_id, dumps(flat) if flat else b"", control, b'{"row": 1}', 100, abort, GROUP, ack, token,
            notice, 100]


def _commit_keys(s: Strategy) -> list[str]:
    return [s.runtime, keys.strategy_key(s.sid), keys.order_logs_stream(s.part), keys.control_stream(s.part),
            s.orders, s.lock, keys.notify_stream(s.part)]


async def test_commit_writes_everything_acks_and_releases_in_one_step(redis: Redis, s: Strategy) -> None:
    commit = redis.register_script(state_module._COMMIT)
    await s.load(redis)
    msg_id = await s.delivered(redis, s.buy())
    await s.held_by(redis, "me")
    abort = event_to_json(AbortEvent(strategy_id=s.sid, run_id=s.run_id, trading_day=s.plan.trading_day,
                                     reason="test"))
    assert await commit(keys=_commit_keys(s), args=_commit_args(
        s, runtime={"position": "bought"}, control=b'{"action": "position"}', abort=abort, ack=msg_id, token="me",
        notice=b'{"n": 1}')) == 1
    assert await redis.hget(s.runtime, "position") == b"bought"
    assert (await redis.xrevrange(keys.control_stream(s.part), count=1))[0][1] == {b"event": b'{"action": "position"}'}
    assert [f for _, f in await redis.xrange(keys.order_logs_stream(s.part))] == [{b"row": b'{"row": 1}'}]
    assert [f for _, f in await redis.xrange(keys.notify_stream(s.part))] == [{b"notice": b'{"n": 1}'}]
    assert (await redis.xrevrange(s.orders, count=1))[0][1] == {b"event": abort}
    assert (await redis.xpending(s.orders, GROUP))["pending"] == 0
    assert not await redis.exists(s.lock) and await s.lock_state(redis) == b"free"


async def test_commit_never_writes_the_runtime_of_another_run(redis: Redis, s: Strategy) -> None:
    commit = redis.register_script(state_module._COMMIT)
    await s.load(redis)
    control_before = await redis.xlen(keys.control_stream(s.part))
    await commit(keys=_commit_keys(s), args=_commit_args(s, runtime={"position": "bought"}, control=b"{}",
                                                         run_id="an-ended-run"))
    assert await redis.hget(s.runtime, "position") == b"none"
    assert await redis.xlen(keys.control_stream(s.part)) == control_before
    assert await redis.xlen(keys.order_logs_stream(s.part)) == 1  # the row is always written
    await redis.delete(keys.strategy_key(s.sid), s.runtime)  # unloaded: no resurrection either
    await commit(keys=_commit_keys(s), args=_commit_args(s, runtime={"position": "bought"}))
    assert not await redis.exists(s.runtime)


async def test_commit_without_ack_keeps_the_lock_and_the_entry_pending(redis: Redis, s: Strategy) -> None:
    commit = redis.register_script(state_module._COMMIT)
    await s.load(redis)
    await s.delivered(redis, s.buy())
    await s.held_by(redis, "me")
    await commit(keys=_commit_keys(s), args=_commit_args(s, runtime={"position": "bought"}, token="me"))
    assert await redis.get(s.lock) == b"me" and await s.lock_state(redis) == b"locked"
    assert (await redis.xpending(s.orders, GROUP))["pending"] == 1


async def test_commit_after_the_lock_was_lost_leaves_the_new_holders_lock(redis: Redis, s: Strategy) -> None:
    commit = redis.register_script(state_module._COMMIT)
    await s.load(redis)
    msg_id = await s.delivered(redis, s.buy())
    await s.held_by(redis, "new-holder")
    await commit(keys=_commit_keys(s), args=_commit_args(s, runtime={"position": "bought"}, ack=msg_id, token="me"))
    assert (await redis.xpending(s.orders, GROUP))["pending"] == 0  # the entry is done
    assert await redis.get(s.lock) == b"new-holder" and await s.lock_state(redis) == b"locked"
    assert await redis.hget(s.runtime, "position") == b"bought"  # the outcome is written all the same


async def test_commit_releasing_for_another_run_frees_the_lock_and_writes_no_runtime(redis: Redis,
                                                                                    s: Strategy) -> None:
    commit = redis.register_script(state_module._COMMIT)
    await s.load(redis)
    msg_id = await s.delivered(redis, s.buy())
    await s.held_by(redis, "me")
    await commit(keys=_commit_keys(s), args=_commit_args(s, runtime={"position": "bought"}, ack=msg_id, token="me",
                                                         run_id="an-ended-run"))
    assert not await redis.exists(s.lock) and await s.lock_state(redis) == b"free"
    assert await redis.hget(s.runtime, "position") == b"none"
    await redis.set(s.lock, "me", px=5000)
    await redis.delete(keys.strategy_key(s.sid), s.runtime)  # unloaded: the release creates no runtime
    await commit(keys=_commit_keys(s), args=_commit_args(s, runtime={"position": "bought"}, ack=msg_id, token="me"))
    assert not await redis.exists(s.lock, s.runtime)


async def test_lock_read_returns_the_runtime_as_locked_even_without_a_lock_state_field(redis: Redis,
                                                                                      s: Strategy) -> None:
    lock_read = redis.register_script(state_module._LOCK_READ)
    await s.load(redis, Position.bought)
    await redis.hdel(s.runtime, "lock_state")
    reply = await lock_read(keys=_lock_read_keys(s), args=_lock_read_args(s))
    runtime = dict(zip(reply[1][::2], reply[1][1::2], strict=True))
    assert runtime[b"lock_state"] == b"locked" and runtime[b"position"] == b"bought"
    assert await s.lock_state(redis) == b"locked"


async def test_ack_release_acks_and_releases_only_its_own_lock(redis: Redis, s: Strategy) -> None:
    ack_release = redis.register_script(state_module._ACK_RELEASE)
    await s.load(redis)
    msg_id = await s.delivered(redis, s.buy())
    await s.held_by(redis, "other")
    assert await ack_release(keys=[s.orders, s.lock, s.runtime], args=[GROUP, msg_id, "me"]) == 1
    assert (await redis.xpending(s.orders, GROUP))["pending"] == 0
    assert await redis.get(s.lock) == b"other" and await s.lock_state(redis) == b"locked"
    await redis.set(s.lock, "me", px=5000)
    assert await ack_release(keys=[s.orders, s.lock, s.runtime], args=[GROUP, msg_id, "me"]) == 1
    assert not await redis.exists(s.lock) and await s.lock_state(redis) == b"free"


def _dead_keys(s: Strategy, with_strategy: bool) -> list[str]:
    out = [keys.orders_dead_stream(s.part), s.orders]
    return [*out, keys.strategy_key(s.sid)] if with_strategy else out


async def test_dead_letter_moves_the_entry_and_queues_the_abort_of_the_loaded_run(redis: Redis,
                                                                                  s: Strategy) -> None:
    dead = redis.register_script(state_module._DEAD_LETTER)
    await s.load(redis)
    msg_id = await s.delivered(redis, b"junk")
    abort = b'{"event_type": "ABORT"}'
    reply = await dead(keys=_dead_keys(s, True), args=[b"junk", "malformed", msg_id, 4, GROUP, 100, s.run_id, abort])
    assert reply == 2
    (_, fields), = await redis.xrange(keys.orders_dead_stream(s.part))
    assert fields == {b"event": b"junk", b"reason": b"malformed", b"msg_id": msg_id.encode(), b"deliveries": b"4"}
    assert (await redis.xpending(s.orders, GROUP))["pending"] == 0
    assert (await redis.xrevrange(s.orders, count=1))[0][1] == {b"event": abort}


async def test_dead_letter_queues_no_abort_for_another_run_or_an_entry_acked_before(redis: Redis,
                                                                                    s: Strategy) -> None:
    dead = redis.register_script(state_module._DEAD_LETTER)
    await s.load(redis)
    msg_id = await s.delivered(redis, b"junk")
    args = [b"junk", "why", msg_id, 1, GROUP, 100]
    assert await dead(keys=_dead_keys(s, True), args=[*args, "another-run", b"abort"]) == 1
    assert await redis.xlen(s.orders) == 1  # no ABORT
    # Already acked (by another consumer's dead letter): recorded, but no second ABORT.
    assert await dead(keys=_dead_keys(s, True), args=[*args, s.run_id, b"abort"]) == 0
    assert await redis.xlen(s.orders) == 1
    assert await dead(keys=_dead_keys(s, False), args=args) == 0  # without a strategy: the XACK count
    assert await redis.xlen(keys.orders_dead_stream(s.part)) == 3


async def test_entry_pending_sees_a_buy_pending_or_not_yet_delivered(redis: Redis, s: Strategy) -> None:
    pending = redis.register_script(state_module._ENTRY_PENDING)

    async def asked(run_id: str | None = None) -> int:
        return await pending(keys=[s.orders], args=[GROUP, s.sid, run_id or s.run_id, 100])

    msg_id = await s.delivered(redis, s.buy())
    assert await asked() == 1  # delivered to a consumer, not acked
    assert await asked("another-run") == 0
    await redis.xack(s.orders, GROUP, msg_id)
    assert await asked() == 0
    retry = event_to_json(RetryEvent(strategy_id=s.sid, run_id=s.run_id, trading_day=s.plan.trading_day,
                                     attempt=2, retry_of="BUY"))
    await redis.xadd(s.orders, {"event": retry})  # not delivered yet
    assert await asked() == 1


async def test_entry_pending_ignores_exits_other_strategies_and_junk(redis: Redis, s: Strategy) -> None:
    pending = redis.register_script(state_module._ENTRY_PENDING)
    other = Strategy()
    await s.delivered(redis, b"not json")
    sell = event_to_json(SellEvent(strategy_id=s.sid, run_id=s.run_id, trading_day=s.plan.trading_day))
    for raw in (sell, other.buy(), b"[1, 2]"):
        await redis.xadd(s.orders, {"event": raw})
    await redis.xadd(s.orders, {"other_field": s.buy()})
    assert await pending(keys=[s.orders], args=[GROUP, s.sid, s.run_id, 100]) == 0


# --- services.api.run_control --------------------------------------------------------------------

def _square_off_keys(s: Strategy) -> list[str]:
    return [keys.strategy_key(s.sid), s.runtime, keys.symbol_strategies_key("INFY", s.part), keys.schedule_key(s.part),
            keys.control_stream(s.part), s.orders, keys.square_off_marker_key(s.sid, s.run_id)]


def _square_off_args(s: Strategy) -> list[Any]:
    return [s.sid, event_to_json(s.plan.buy), event_to_json(s.plan.sell), b'{"action": "stopped"}', 100,
            b'{"event_type": "SELL"}', 60]


async def test_square_off_while_bought_unschedules_and_queues_the_exit(redis: Redis, s: Strategy) -> None:
    square_off = redis.register_script(run_control._SQUARE_OFF)
    await s.load(redis, Position.bought)
    assert await square_off(keys=_square_off_keys(s), args=_square_off_args(s)) == 1
    assert await redis.exists(keys.strategy_key(s.sid), s.runtime) == 2
    assert not await redis.sismember(keys.symbol_strategies_key("INFY", s.part), s.sid)
    assert await redis.zcard(keys.schedule_key(s.part)) == 0
    assert 0 < await redis.ttl(keys.square_off_marker_key(s.sid, s.run_id)) <= 60
    assert [f for _, f in await redis.xrange(s.orders)] == [{b"event": b'{"event_type": "SELL"}'}]
    assert (await redis.xrevrange(keys.control_stream(s.part), count=1))[0][1] == {b"event": b'{"action": "stopped"}'}


@pytest.mark.parametrize("position", [Position.none, Position.sold])
async def test_square_off_without_a_position_unloads_fully(redis: Redis, s: Strategy, position: Position) -> None:
    square_off = redis.register_script(run_control._SQUARE_OFF)
    await s.load(redis, position)
    assert await square_off(keys=_square_off_keys(s), args=_square_off_args(s)) == 0
    assert not await redis.exists(keys.strategy_key(s.sid), s.runtime, keys.square_off_marker_key(s.sid, s.run_id))
    assert not await redis.exists(s.orders) and await redis.zcard(keys.schedule_key(s.part)) == 0


@pytest.mark.parametrize("lock_held", [False, True])
async def test_square_off_of_an_ended_run_loads_it_once(redis: Redis, s: Strategy, lock_held: bool) -> None:
    ended = redis.register_script(run_control._SQUARE_OFF_ENDED)
    if lock_held:  # e.g. an executor skipping a late event of the old run
        await redis.set(s.lock, "executor", px=5000)
    runtime = RuntimeState(position=Position.bought, last_buy_order="1", updated_at=datetime.now(UTC))
    flat = [x for pair in runtime.to_redis_hash().items() for x in pair]
    script_keys = [keys.strategy_key(s.sid), s.runtime, keys.exit_attempt_key(s.sid, s.run_id),
                   keys.square_off_marker_key(s.sid, s.run_id), s.orders, s.lock]
    args = [dumps(s.config), dumps(flat), b'{"event_type": "SELL"}', 60]
    assert await ended(keys=script_keys, args=args) == 1
    assert await ended(keys=script_keys, args=args) == 0  # a second request queues no second exit
    assert await redis.hget(s.runtime, "position") == b"bought"
    assert await s.lock_state(redis) == (b"locked" if lock_held else b"free")
    assert await redis.exists(*script_keys[2:4]) == 2 and await redis.xlen(s.orders) == 1
    assert orjson.loads(await redis.get(keys.strategy_key(s.sid)))["run_id"] == s.run_id
