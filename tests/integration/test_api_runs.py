"""Start/stop: exactly the Redis keys promised, Postgres in step, nothing half-loaded."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import psycopg
import pytest

from libs.schema import keys
from libs.schema.models import StrategyConfig, parse_event
from libs.trading.calendar import IST, epoch_ms
from libs.trading.runs import run_id_for
from services.api.broker import mark_invalid
from tests.integration.api_support import clock

pytest_plugins = ["tests.integration.api_support"]


def dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def strategy_row(database_url: str, strategy_id: str) -> dict:
    with psycopg.connect(dsn(database_url)) as conn:
        cur = conn.execute("SELECT status::text, started_at, stopped_at FROM strategies WHERE id = %s",
                           (strategy_id,))
        status, started_at, stopped_at = cur.fetchone()
    return {"status": status, "started_at": started_at, "stopped_at": stopped_at}


async def redis_keys(redis) -> set[str]:
    # Session and throttle keys of the API's auth are not part of a run.
    return {k.decode() for k in await redis.keys("*") if not k.startswith((b"auth:", b"throttle:"))}


async def control_actions(redis, strategy_id: str) -> list[str]:
    entries = await redis.xrange(keys.CONTROL_STREAM)
    messages = [orjson.loads(fields[b"event"]) for _id, fields in entries]
    return [m["action"] for m in messages if m["strategy_id"] == strategy_id]


async def started(api, **fields):
    user = await api.connected_user()
    strategy = await api.strategy(user, buy_time=clock(600), sell_time=clock(1200), **fields)
    reply = await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user, expect=200)
    return user, strategy, reply


async def test_start_loads_exactly_the_promised_keys(api, redis, clean_db) -> None:
    before = datetime.now(UTC)
    user, strategy, reply = await started(api)
    sid = strategy["id"]
    assert reply.body["status"] == "running" and reply.body["position"] == "none"
    row = strategy_row(clean_db, sid)
    assert row["status"] == "running" and row["stopped_at"] is None and before <= row["started_at"]
    run_id = run_id_for(row["started_at"])
    assert await redis_keys(redis) == {
        keys.strategy_key(sid), keys.runtime_key(sid), keys.symbol_strategies_key("INFY"), keys.SCHEDULE,
        keys.CONTROL_STREAM, keys.broker_credentials_key(user.id), keys.instruments_key("NSE", _ist_today()),
        keys.entry_unsent_key(sid, run_id),  # a new run: its first BUY may go out without a tag lookup
    }
    config = StrategyConfig.model_validate_json(await redis.get(keys.strategy_key(sid)))
    assert config.run_id == run_id and config.user_id == uuid.UUID(user.id) and config.status == "running"
    assert config.instrument_token == 408065 and config.api_key_fp and config.quantity == 10
    assert (await redis.hgetall(keys.runtime_key(sid)))[b"position"] == b"none"
    assert await redis.smembers(keys.symbol_strategies_key("INFY")) == {sid.encode()}
    members = await redis.zrange(keys.SCHEDULE, 0, -1, withscores=True)
    events = sorted(((parse_event(m), int(score)) for m, score in members), key=lambda e: e[1])
    assert [e.event_type for e, _ in events] == ["BUY", "SELL"]
    for event, score in events:
        assert event.run_id == run_id and str(event.strategy_id) == sid and score == epoch_ms(event.trigger_time)
    assert await control_actions(redis, sid) == ["started"]


def _ist_today():
    return datetime.now(UTC).astimezone(IST).date()


async def test_starting_a_running_strategy_is_a_no_op(api, redis, clean_db) -> None:
    user, strategy, _ = await started(api)
    first = strategy_row(clean_db, strategy["id"])
    again = await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user, expect=200)
    assert again.body["status"] == "running"
    assert strategy_row(clean_db, strategy["id"])["started_at"] == first["started_at"]
    assert await redis.zcard(keys.SCHEDULE) == 2
    assert await control_actions(redis, strategy["id"]) == ["started"]


async def test_started_at_keeps_microseconds(api, clean_db, redis) -> None:
    _, strategy, _ = await started(api)
    row = strategy_row(clean_db, strategy["id"])
    config = StrategyConfig.model_validate_json(await redis.get(keys.strategy_key(strategy["id"])))
    assert config.run_id == row["started_at"].astimezone(UTC).isoformat(timespec="microseconds")


async def test_stop_unloads_everything_and_records_stopped_at(api, redis, clean_db) -> None:
    user, strategy, _ = await started(api)
    sid = strategy["id"]
    reply = await api.v1("POST", "/strategies/stop", {"strategy_id": sid}, user=user, expect=200)
    assert reply.body["status"] == "stopped" and reply.body["position"] == "none"
    row = strategy_row(clean_db, sid)
    assert row["status"] == "stopped" and row["stopped_at"] >= row["started_at"]
    assert await redis_keys(redis) == {keys.CONTROL_STREAM, keys.broker_credentials_key(user.id),
                                       keys.instruments_key("NSE", _ist_today())}
    assert await control_actions(redis, sid) == ["started", "stopped"]
    assert not await redis.exists(keys.lock_key(sid))
    # Stopping again is a no-op; starting again is a new run with a new run id.
    await api.v1("POST", "/strategies/stop", {"strategy_id": sid}, user=user, expect=200)
    await api.v1("POST", "/strategies/start", {"strategy_id": sid}, user=user, expect=200)
    assert strategy_row(clean_db, sid)["started_at"] > row["started_at"]


async def test_square_off_while_bought_keeps_the_run_and_enqueues_a_sell(api, redis, clean_db) -> None:
    user, strategy, _ = await started(api)
    sid = strategy["id"]
    await redis.hset(keys.runtime_key(sid), mapping={"position": "bought", "last_action": "BUY"})
    reply = await api.v1("POST", "/strategies/stop", {"strategy_id": sid, "square_off": True}, user=user,
                         expect=200)
    assert reply.body["status"] == "stopped" and reply.body["position"] == "bought"
    assert strategy_row(clean_db, sid)["status"] == "stopped"
    assert await redis.exists(keys.strategy_key(sid), keys.runtime_key(sid)) == 2
    assert await redis.zcard(keys.SCHEDULE) == 0
    assert not await redis.exists(keys.symbol_strategies_key("INFY"))
    assert await control_actions(redis, sid) == ["started", "stopped"]
    (entry,) = await redis.xrange(keys.ORDERS_STREAM)
    sell = parse_event(entry[1][b"event"])
    config = StrategyConfig.model_validate_json(await redis.get(keys.strategy_key(sid)))
    assert sell.event_type == "SELL" and sell.metadata == {"square_off": True} and sell.run_id == config.run_id
    # While that exit is in flight the strategy cannot be restarted or deleted.
    restart = await api.v1("POST", "/strategies/start", {"strategy_id": sid}, user=user)
    assert restart.status == 409 and restart.body["error"]["code"] == "strategy_exiting"
    delete = await api.v1("DELETE", f"/strategies/{sid}", user=user)
    assert delete.status == 409 and delete.body["error"]["code"] == "strategy_exiting"


async def test_square_off_without_a_position_is_a_plain_stop(api, redis) -> None:
    user, strategy, _ = await started(api)
    await api.v1("POST", "/strategies/stop", {"strategy_id": strategy["id"], "square_off": True}, user=user,
                 expect=200)
    assert not await redis.exists(keys.strategy_key(strategy["id"]), keys.runtime_key(strategy["id"]))
    assert not await redis.exists(keys.ORDERS_STREAM)


async def test_stop_without_square_off_leaves_a_bought_position_alone(api, redis) -> None:
    user, strategy, _ = await started(api)
    await redis.hset(keys.runtime_key(strategy["id"]), "position", "bought")
    await api.v1("POST", "/strategies/stop", {"strategy_id": strategy["id"]}, user=user, expect=200)
    assert not await redis.exists(keys.ORDERS_STREAM, keys.strategy_key(strategy["id"]))


async def test_stop_waits_for_an_executor_holding_the_lock_then_409(api, redis, clean_db) -> None:
    user, strategy, _ = await started(api)
    await redis.set(keys.lock_key(strategy["id"]), "executor-1", px=30_000)
    reply = await api.v1("POST", "/strategies/stop", {"strategy_id": strategy["id"]}, user=user)
    assert reply.status == 409 and reply.body["error"]["code"] == "strategy_busy"
    assert strategy_row(clean_db, strategy["id"])["status"] == "running"
    assert await redis.get(keys.lock_key(strategy["id"])) == b"executor-1"
    assert await redis.exists(keys.strategy_key(strategy["id"]))


@pytest.mark.parametrize("body", [{"strategy_id": "nope"}, {}, {"strategy_id": str(uuid.uuid4()), "x": 1}])
async def test_start_validation(api, body) -> None:
    user = await api.connected_user()
    assert (await api.v1("POST", "/strategies/start", body, user=user)).status == 422


async def test_stop_square_off_must_be_a_boolean(api) -> None:
    user = await api.connected_user()
    reply = await api.v1("POST", "/strategies/stop", {"strategy_id": str(uuid.uuid4()), "square_off": "yes"},
                         user=user)
    assert reply.status == 422 and reply.body["error"]["details"][0]["loc"] == ["square_off"]


async def test_start_needs_valid_broker_credentials(api, redis, clean_db) -> None:
    user = await api.connected_user()
    strategy = await api.strategy(user)
    # A rejected connect no longer replaces working credentials (issue 13 item 1): the
    # stored ones become invalid the way an expired token does, when the broker says so.
    await mark_invalid(api.app, uuid.UUID(user.id))
    reply = await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user)
    assert reply.status == 409 and reply.body["error"]["code"] == "broker_credentials_invalid"
    assert strategy_row(clean_db, strategy["id"])["status"] == "created"
    assert not await redis.exists(keys.strategy_key(strategy["id"]), keys.SCHEDULE)


async def test_start_with_unknown_strategy_is_404(api) -> None:
    user = await api.connected_user()
    reply = await api.v1("POST", "/strategies/start", {"strategy_id": str(uuid.uuid4())}, user=user)
    assert reply.status == 404


async def test_redis_refusing_the_load_rolls_postgres_back(api_factory, redis, redis_url, clean_db) -> None:
    # A Redis user that may do everything except run scripts: load_run fails after the row was updated.
    await redis.acl_setuser("noscripts", enabled=True, passwords=["+pw-noscripts"], keys=["*"], channels=["*"],
                            commands=["+@all", "-eval", "-evalsha"])
    try:
        limited = redis_url.replace("redis://", "redis://noscripts:pw-noscripts@")
        api = await api_factory(redis_url=limited)
        user = await api.connected_user()
        strategy = await api.strategy(user)
        reply = await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user)
        assert reply.status == 503 and reply.body["error"]["code"] == "redis_unavailable"
        row = strategy_row(clean_db, strategy["id"])
        assert row["status"] == "created" and row["started_at"] is None
        assert not await redis.exists(keys.strategy_key(strategy["id"]), keys.runtime_key(strategy["id"]),
                                      keys.SCHEDULE)
    finally:
        await redis.acl_deluser("noscripts")


async def test_postgres_failing_the_commit_undoes_the_redis_load(api, redis, clean_db) -> None:
    user = await api.connected_user()
    strategy = await api.strategy(user)
    # A deferred constraint trigger fails the COMMIT itself, after load_run already ran.
    with psycopg.connect(dsn(clean_db), autocommit=True) as conn:
        conn.execute("""
            CREATE OR REPLACE FUNCTION tw_test_refuse_running() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION 'refused by test'; END $$ LANGUAGE plpgsql;
            CREATE CONSTRAINT TRIGGER tw_test_refuse AFTER UPDATE ON strategies
              DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.status = 'running')
              EXECUTE FUNCTION tw_test_refuse_running();
        """)
    try:
        reply = await api.v1("POST", "/strategies/start", {"strategy_id": strategy["id"]}, user=user)
        assert reply.status == 503, reply.text
        assert strategy_row(clean_db, strategy["id"])["status"] == "created"
        assert not await redis.exists(keys.strategy_key(strategy["id"]), keys.runtime_key(strategy["id"]),
                                      keys.SCHEDULE, keys.symbol_strategies_key("INFY"))
        assert await control_actions(redis, strategy["id"]) == ["started", "stopped"]
    finally:
        with psycopg.connect(dsn(clean_db), autocommit=True) as conn:
            conn.execute("DROP TRIGGER IF EXISTS tw_test_refuse ON strategies; "
                         "DROP FUNCTION IF EXISTS tw_test_refuse_running();")
