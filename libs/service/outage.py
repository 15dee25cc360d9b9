"""The exceptions a Postgres outage raises, told apart from the ones a bug raises.

A retry loop that waits out Postgres catches these and nothing wider (for Redis,
redis-py's RedisError plays the same part):
anything else is a defect and is logged with its traceback (`log.exception`),
never reported as "unavailable".
"""

from __future__ import annotations

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

# Postgres down, restarting or unreachable: SQLAlchemy wraps the driver's connection
# failures as OperationalError (InterfaceError for a connection already closed),
# a full pool times out, and a socket can fail below the driver (OSError, which
# includes the builtin TimeoutError of asyncio.wait_for).
POSTGRES_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError, OSError)
