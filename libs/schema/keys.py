"""Name every Redis key, stream, group and channel Tickwise uses.

This module is the only place that spells a Redis name: services import a
function or constant from here and never build a key string themselves, so a
rename is one edit and a grep for the function finds every user.

Ids may be passed as `uuid.UUID` or `str`; both yield the same key.
"""

from __future__ import annotations

from datetime import date
from uuid import UUID

__all__ = [
    "CONTROL_MAXLEN",
    "CONTROL_STREAM",
    "DEAD_MAXLEN",
    "EXECUTORS_GROUP",
    "LOG_WRITERS_GROUP",
    "NOTIFIERS_GROUP",
    "NOTIFY_DEAD_STREAM",
    "NOTIFY_MAXLEN",
    "NOTIFY_PENDING",
    "NOTIFY_SCHEDULE",
    "NOTIFY_STREAM",
    "ORDERS_DEAD_STREAM",
    "ORDERS_STREAM",
    "ORDER_LOGS_DEAD_STREAM",
    "ORDER_LOGS_STREAM",
    "SCHEDULE",
    "SCHEDULE_WAKEUP_CHANNEL",
    "STATE_MARKER",
    "broker_credentials_key",
    "exit_attempt_key",
    "instruments_key",
    "lock_key",
    "login_throttle_addr_key",
    "login_throttle_email_key",
    "order_rate_key",
    "price_key",
    "runtime_key",
    "stoploss_marker_key",
    "strategy_key",
    "symbol_strategies_key",
]

Id = UUID | str


def _id(value: Id) -> str:
    # str(UUID) is the canonical lower-case hyphenated form; normalising str
    # input the same way keeps "ABC..." and "abc..." from naming two keys.
    return str(value).lower()


def _symbol(symbol: str) -> str:
    # Symbols are upper-case everywhere (the Symbol type enforces it); doing it
    # here too means a stray lower-case caller still hits the same key.
    return symbol.strip().upper()


# --- strategy state -----------------------------------------------------------

def strategy_key(strategy_id: Id) -> str:
    """Return `strategy:{id}`."""
    # STRING, JSON of StrategyConfig of a running strategy. No TTL: it lives
    # exactly as long as the strategy runs and is deleted on stop/exit.
    return f"strategy:{_id(strategy_id)}"


def runtime_key(strategy_id: Id) -> str:
    """Return `runtime:{id}`."""
    # HASH of RuntimeState fields (HSET single fields). No TTL: it is the state
    # machine of a live run; rebuilt from the broker's order book if lost.
    return f"runtime:{_id(strategy_id)}"


def symbol_strategies_key(symbol: str) -> str:
    """Return `symbol:{SYM}:strategies`."""
    # SET of ids of running strategies on SYM, read by the market listener.
    # No TTL: membership follows start/stop, not time.
    return f"symbol:{_symbol(symbol)}:strategies"


def price_key(symbol: str) -> str:
    """Return `price:{SYM}`."""
    # STRING, last traded price. Overwritten on every tick; no TTL because a
    # stale price is still the best one known (readers check the age elsewhere).
    return f"price:{_symbol(symbol)}"


def lock_key(strategy_id: Id) -> str:
    """Return `lock_state:{id}`."""
    # STRING, owner token of the executor working on the strategy. Set with
    # PX so a crashed executor's lock expires instead of blocking the strategy.
    return f"lock_state:{_id(strategy_id)}"


def stoploss_marker_key(strategy_id: Id, run_id: str) -> str:
    """Return `stoploss:fired:{id}:{run_id}`."""
    # STRING set NX when a listener fires STOPLOSS: one per strategy run. Given
    # a TTL of a day or more by the writer; the run_id already scopes it.
    return f"stoploss:fired:{_id(strategy_id)}:{run_id}"


def exit_attempt_key(strategy_id: Id, run_id: str) -> str:
    """Return `exit:attempted:{id}:{run_id}`."""
    # STRING set by the executor just before it sends a run's exit order, so any
    # later exit event (another executor, after a crash) looks the exit tag up
    # at the broker before placing. EX of two days; the run_id scopes it.
    return f"exit:attempted:{_id(strategy_id)}:{run_id}"


# STRING written by the scheduler after each rebuild from Postgres. Its absence
# while Redis's run_id is unchanged means Redis lost its data (FLUSHALL, an empty
# replica promoted): rebuild. No TTL: it must outlive everything it vouches for.
STATE_MARKER = "tickwise:state"


# --- scheduling ---------------------------------------------------------------

# ZSET, member = canonical JSON of a due event, score = epoch ms due. No TTL:
# members leave when moved to ORDERS_STREAM or when their strategy stops.
SCHEDULE = "schedule"

# Pub/sub channel, published to whenever SCHEDULE gains an earlier member, so
# sleeping schedulers wake up early. Pub/sub holds nothing, so no TTL.
SCHEDULE_WAKEUP_CHANNEL = "schedule:wakeup"


# --- streams and consumer groups ----------------------------------------------

# STREAM, field `event` = JSON of an event; consumed by EXECUTORS_GROUP.
# No TTL; the scheduler trims it (XTRIM MINID) below every group's last
# delivered-and-acked entry, because acked entries are history only.
ORDERS_STREAM = "queue:orders"

# STREAM of events delivered too often: fields event, reason, msg_id,
# deliveries. Kept for humans to inspect; trimmed with MAXLEN, no TTL.
ORDERS_DEAD_STREAM = "queue:orders:dead"

# STREAM, field `row` = JSON of an OrderLogRow; consumed by LOG_WRITERS_GROUP.
# No TTL: rows must wait here through a Postgres outage.
ORDER_LOGS_STREAM = "queue:order_logs"

# STREAM of order-log rows Postgres refused for good; kept for inspection.
ORDER_LOGS_DEAD_STREAM = "queue:order_logs:dead"

# STREAM, field `event` = JSON of a ControlMessage (started/stopped/position)
# telling market listeners what to watch. Trimmed with MAXLEN, no TTL.
CONTROL_STREAM = "control:strategies"

# Approximate MAXLEN of CONTROL_STREAM: listeners read it live and rebuild from
# a scan at start, so only recent entries matter; 100k covers hours of churn.
CONTROL_MAXLEN = 100_000

# Approximate MAXLEN of each dead-letter stream (ORDERS_DEAD_STREAM,
# ORDER_LOGS_DEAD_STREAM): kept for humans, bounded so a flood cannot fill Redis.
DEAD_MAXLEN = 100_000

# Consumer group of executors on ORDERS_STREAM.
EXECUTORS_GROUP = "executors"

# Consumer group of Postgres writers on ORDER_LOGS_STREAM.
LOG_WRITERS_GROUP = "log-writers"


# --- notifications ------------------------------------------------------------

# STREAM, field `notice` = JSON of a Notice (order filled, run failed, token
# expired, kill switch) for its user; consumed by NOTIFIERS_GROUP. Written in
# the executor's commit script. Trimmed with MAXLEN: an entry is only a
# hand-over, acked once fanned out into NOTIFY_SCHEDULE.
NOTIFY_STREAM = "notify:events"
NOTIFY_MAXLEN = 100_000

# Consumer group of notification deliverers (API processes) on NOTIFY_STREAM.
NOTIFIERS_GROUP = "notifiers"

# ZSET of deliveries, member = "{notice_id}|{channel}", score = epoch ms when
# the next attempt is due; a claimed member is pushed one lease ahead, so a
# crashed deliverer's attempt is retried by another. No TTL: members leave on
# success or when dead-lettered.
NOTIFY_SCHEDULE = "notify:schedule"

# HASH member -> JSON {notice, channel, attempt} of every delivery in
# NOTIFY_SCHEDULE. No TTL, for the same reason.
NOTIFY_PENDING = "notify:pending"

# STREAM of deliveries given up after the attempt limit, with the last error;
# kept for humans to inspect. Trimmed with MAXLEN, no TTL.
NOTIFY_DEAD_STREAM = "notify:dead"


# --- broker limits and caches -------------------------------------------------

def order_rate_key(api_key_fp: str) -> str:
    """Return `ratelimit:orders:{fp}` for a Kite api_key fingerprint."""
    # Rate limiter shared by all executors for one Kite api_key: a ZSET log of
    # order times over a rolling window (Kite counts per rolling second, which a
    # refilling token bucket overshoots). Keyed by the fingerprint so the key
    # itself never appears in Redis. PX TTL of one window: idle means empty.
    return f"ratelimit:orders:{api_key_fp}"


def instruments_key(exchange: str, day: date | str) -> str:
    """Return `instruments:{EXCHANGE}:{yyyy-mm-dd}`."""
    # HASH symbol -> instrument_token for one trading day. Tokens can change
    # between days, so the day is in the name and the writer sets a ~2 day TTL.
    day_text = day.isoformat() if isinstance(day, date) else day
    return f"instruments:{exchange.strip().upper()}:{day_text}"


def broker_credentials_key(user_id: Id) -> str:
    """Return `broker:{user_id}`."""
    # HASH api_key, access_token (AES-GCM ciphertexts copied verbatim from
    # Postgres), api_key_fp, is_valid ("1"/"0"): the order path's credentials,
    # written by the API on connect/session/start. No TTL: Postgres is the
    # source and every start rewrites it.
    return f"broker:{_id(user_id)}"


# --- API login throttling -----------------------------------------------------

def login_throttle_email_key(email_digest: str) -> str:
    """Return `throttle:login:email:{digest}`."""
    # STRING counter of failed logins for one account, EX 60: a short window
    # slows guessing without locking a user out for long. A digest, not the
    # address, so Redis holds no personal data.
    return f"throttle:login:email:{email_digest}"


def login_throttle_addr_key(addr: str) -> str:
    """Return `throttle:login:addr:{addr}`."""
    # STRING counter of failed logins from one client address, EX 60, for the
    # same reason as the per-email counter.
    return f"throttle:login:addr:{addr}"
