"""The alembic migrations build exactly the schema libs.schema.tables declares."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, inspect, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from libs.schema.migrate import alembic_config, downgrade_base, upgrade_head
from libs.schema.models import EventType, OrderLogStatus, StrategyOut, StrategyStatus, order_log_id
from libs.schema.tables import Base, BrokerCredential, OrderLog, Strategy, User
from tests.support.postgres import running_postgres

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = {"users", "broker_credentials", "strategies", "order_logs", "notification_settings"}
ENUM_TYPES = {"strategy_status", "order_event_type", "order_log_status"}


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_postgres(tmp_path_factory.mktemp("schema-pg")) as url:
        upgrade_head(url)
        yield url


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
        session.rollback()
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE users, broker_credentials, strategies, order_logs CASCADE"))


def schema_diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
    return compare_metadata(context, Base.metadata)


def enum_types(connection: Connection) -> set[str]:
    return set(connection.execute(text("SELECT typname FROM pg_type WHERE typtype = 'e'")).scalars())


def test_migrated_database_matches_the_models(engine: Engine) -> None:
    with engine.connect() as connection:
        assert schema_diff(connection) == []
        assert set(inspect(connection).get_table_names()) == TABLES | {"alembic_version"}
        assert enum_types(connection) == ENUM_TYPES


def test_comparison_notices_drift(engine: Engine) -> None:
    # Guards the test above against passing vacuously. DDL is transactional in
    # Postgres, so rolling back restores the migrated schema.
    with engine.connect() as connection, connection.begin() as transaction:
        connection.execute(text("DROP INDEX ix_order_logs_strategy_id_created_at"))
        connection.execute(text("CREATE INDEX ix_order_logs_strategy_id_created_at ON order_logs (strategy_id, created_at)"))
        connection.execute(text("ALTER TABLE strategies ALTER COLUMN symbol TYPE varchar(40)"))
        kinds = {diff[0][0] if isinstance(diff, list) else diff[0] for diff in schema_diff(connection)}
        transaction.rollback()
    assert kinds == {"remove_index", "add_index", "modify_type"}


def test_downgrade_to_base_then_upgrade_to_head(database_url: str, engine: Engine) -> None:
    downgrade_base(database_url)
    with engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) == {"alembic_version"}
        assert enum_types(connection) == set()
    upgrade_head(database_url)
    with engine.connect() as connection:
        assert schema_diff(connection) == []
        head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == head


def test_upgrade_head_twice_is_a_no_op(database_url: str, engine: Engine) -> None:
    upgrade_head(database_url)
    with engine.connect() as connection:
        assert schema_diff(connection) == []


def test_alembic_cli_reads_database_url_from_the_environment(database_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "current"],
        cwd=tmp_path, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert f"{head} (head)" in result.stdout


# --- the tables behave as the contract says ---------------------------------------

def add_user(session: Session, email: str = "a@example.com") -> User:
    user = User(name="A", email=email, password_hash="argon2$...")
    session.add(user)
    session.flush()
    return user


def add_strategy(session: Session, user: User, **changes: object) -> Strategy:
    values: dict[str, object] = {"symbol": "INFY", "buy_time": time(9, 30), "sell_time": time(15, 15),
                                 "stop_loss": 1540.25, "quantity": 10, **changes}
    strategy = Strategy(user_id=user.id, **values)
    session.add(strategy)
    session.flush()
    return strategy


def test_rows_get_defaults_and_read_back_into_api_models(session: Session) -> None:
    strategy = add_strategy(session, add_user(session))
    session.refresh(strategy)
    assert (strategy.status, strategy.exchange, strategy.product) == (StrategyStatus.created, "NSE", "MIS")
    assert strategy.created_at.tzinfo is not None
    out = StrategyOut.model_validate(strategy)
    assert (out.symbol, out.buy_time, out.status) == ("INFY", time(9, 30), StrategyStatus.created)


@pytest.mark.parametrize("changes", [
    {"quantity": 0}, {"quantity": 100_001}, {"stop_loss": 0.0}, {"buy_time": time(15, 15)},
    {"buy_time": time(16)}, {"symbol": "infy"},
])
def test_check_constraints_mirror_the_validation_rules(session: Session, changes: dict[str, object]) -> None:
    user = add_user(session)
    with pytest.raises(IntegrityError):
        add_strategy(session, user, **changes)


def test_emails_are_unique_and_stored_lower_case(session: Session) -> None:
    add_user(session, "a@example.com")
    with pytest.raises(IntegrityError):
        add_user(session, "a@example.com")
    session.rollback()
    with pytest.raises(IntegrityError):
        add_user(session, "A@example.com")


def test_every_lifecycle_status_is_storable(session: Session) -> None:
    user = add_user(session)
    for status in StrategyStatus:
        add_strategy(session, user, status=status)
    stored = session.scalars(select(Strategy.status)).all()
    assert sorted(stored) == sorted(StrategyStatus)


def test_deleting_a_user_cascades_to_everything_they_own(session: Session) -> None:
    user = add_user(session)
    strategy = add_strategy(session, user)
    session.add(BrokerCredential(user_id=user.id, api_key="enc", api_secret="enc", key_id="k1",
                                 api_key_hint="x1y2", api_key_fp="ab12"))
    session.add(OrderLog(strategy_id=strategy.id, user_id=user.id, event_type=EventType.BUY,
                         request_payload={}, status=OrderLogStatus.success, trading_day=date(2025, 2, 25)))
    session.flush()
    session.execute(text("DELETE FROM users WHERE id = :id"), {"id": user.id})
    for table in ("broker_credentials", "strategies", "order_logs"):
        assert session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0


def test_order_log_inserts_are_idempotent_by_stream_entry(session: Session) -> None:
    user = add_user(session)
    strategy = add_strategy(session, user)
    row = {"id": order_log_id("queue:orders", "1700000000000-0"), "strategy_id": strategy.id, "user_id": user.id,
           "event_type": EventType.STOPLOSS, "request_payload": {"tag": "TWX"}, "response_payload": {"id": "1"},
           "status": OrderLogStatus.skipped, "trading_day": date(2025, 2, 25), "tag": "TWX",
           "stream_msg_id": "1700000000000-0", "created_at": datetime(2025, 2, 25, 9, 30, tzinfo=UTC)}
    for _ in range(2):
        session.execute(insert(OrderLog).values(**row).on_conflict_do_nothing(index_elements=["id"]))
    logs = session.scalars(select(OrderLog)).all()
    assert len(logs) == 1 and logs[0].event_type is EventType.STOPLOSS and logs[0].response_payload == {"id": "1"}
