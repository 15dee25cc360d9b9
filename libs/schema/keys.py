"""Name every Redis key, stream, group and channel Tickwise uses.

This module is the only place that spells a Redis name: services import a
function or constant from here and never build a key string themselves, so a
rename is one edit and a grep for the function finds every user.

Ids may be passed as `uuid.UUID` or `str`; both yield the same key.

Redis Cluster: every key ends in a hash tag, `{p<partition>.<n>}`, naming one
of N partitions (`configure_partitions(N)`, 1 by default). A strategy's keys
carry its own partition's tag (`partition_of(strategy_id)`), and so do the
shared streams and sets its scripts write (`orders_stream(p)`, `schedule_key(p)`,
`control_stream(p)`, `order_logs_stream(p)`, `symbol_strategies_key(sym, p)`):
every script then touches one hash slot, and the N partitions' slots are spread
evenly over the 16384 slots, so over the cluster's masters. Partition 0's tag
does not depend on N, so the constants (`ORDERS_STREAM`, `SCHEDULE`, ...) name
partition 0 in every deployment, and with N = 1 they name everything there is.
docs/cluster.md says why and what N may be.
"""

from __future__ import annotations

import binascii
import functools
import itertools
import zlib
from datetime import date
from uuid import UUID

__all__ = [
    "CONTROL_MAXLEN",
    "CONTROL_STREAM",
    "DEAD_MAXLEN",
    "EXECUTORS_GROUP",
    "INSTRUMENTS_TTL_S",
    "LOG_WRITERS_GROUP",
    "NOTIFIERS_GROUP",
    "NOTIFY_DEAD_STREAM",
    "NOTIFY_MAXLEN",
    "NOTIFY_PENDING",
    "NOTIFY_SCHEDULE",
    "NOTIFY_STREAM",
    "OPERATOR_HALT",
    "ORDERS_DEAD_STREAM",
    "ORDERS_STREAM",
    "ORDER_LOGS_DEAD_STREAM",
    "ORDER_LOGS_STREAM",
    "REDIS_EPOCH",
    "RUN_MARKER_TTL_S",
    "SCHEDULE",
    "SCHEDULE_WAKEUP_CHANNEL",
    "STATE_MARKER",
    "TOKEN_VERSION_TTL_S",
    "MAX_PARTITIONS",
    "SLOTS",
    "broker_credentials_key",
    "broker_login_state_key",
    "configure_partitions",
    "consumer_alive_key",
    "control_stream",
    "entry_unsent_key",
    "entry_unsent_pattern",
    "exit_attempt_key",
    "hash_slot",
    "instruments_key",
    "lock_key",
    "login_throttle_addr_key",
    "login_throttle_email_key",
    "login_throttle_pair_key",
    "notify_dead_stream",
    "notify_pending",
    "notify_schedule",
    "notify_stream",
    "order_logs_dead_stream",
    "order_logs_stream",
    "order_rate_key",
    "orders_dead_stream",
    "orders_stream",
    "partition_count",
    "partition_of",
    "partition_tag",
    "price_key",
    "register_throttle_addr_key",
    "revoked_token_key",
    "runtime_key",
    "schedule_key",
    "square_off_marker_key",
    "state_marker_key",
    "stoploss_marker_key",
    "strategy_key",
    "strategy_key_pattern",
    "symbol_strategies_key",
    "symbol_strategies_pattern",
    "token_check_key",
    "token_version_key",
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


# --- partitions and hash slots ------------------------------------------------

SLOTS = 16384
MAX_PARTITIONS = 1024
# Each partition's tag hashes into the first _TAG_WINDOW slots of its 1/N of the
# slot space; 16384 / MAX_PARTITIONS keeps the windows apart.
_TAG_WINDOW = SLOTS // MAX_PARTITIONS
_partitions = 1


def hash_slot(key: str | bytes) -> int:
    """Return the Redis Cluster slot of `key` (CRC16 of its hash tag, as Redis computes it)."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return binascii.crc_hqx(raw, 0) % SLOTS


def configure_partitions(count: int) -> None:
    """Set N, the number of partitions (from the services' settings, once at start)."""
    global _partitions
    if not 1 <= count <= MAX_PARTITIONS:
        raise ValueError(f"partition count must be 1..{MAX_PARTITIONS}, not {count}")
    _partitions = count


def partition_count() -> int:
    """Return N."""
    return _partitions


def partition_of(entity_id: Id) -> int:
    """Return the partition of a strategy, user or account id (stable for a given N)."""
    # CRC32, not hash(): the same id must land in the same partition in every process.
    return zlib.crc32(_id(entity_id).encode()) % _partitions


@functools.cache
def _tag_text(partition: int, count: int) -> str:
    first = partition * SLOTS // count
    for n in itertools.count():
        text = f"p{partition}.{n}"
        if first <= hash_slot(text) < first + _TAG_WINDOW:
            return text
    raise AssertionError("unreachable")


def partition_tag(partition: int) -> str:
    """Return `{p<partition>.<n>}`, the hash tag of one partition's keys."""
    if not 0 <= partition < _partitions:
        raise ValueError(f"partition {partition} outside 0..{_partitions - 1}")
    # Partition 0's window is slots 0..15 whatever N is, so its tag never changes.
    return "{" + _tag_text(partition, 1 if partition == 0 else _partitions) + "}"


def _tagged(name: str, entity_id: Id) -> str:
    return f"{name}:{partition_tag(partition_of(entity_id))}"


# --- strategy state -----------------------------------------------------------

def strategy_key(strategy_id: Id) -> str:
    """Return `strategy:<id>:{tag}` (tag: the strategy's partition)."""
    # STRING, JSON of StrategyConfig of a running strategy. No TTL: it lives
    # exactly as long as the strategy runs and is deleted on stop/exit.
    return _tagged(f"strategy:{_id(strategy_id)}", strategy_id)


def runtime_key(strategy_id: Id) -> str:
    """Return `runtime:<id>:{tag}` (tag: the strategy's partition)."""
    # HASH of RuntimeState fields (HSET single fields). No TTL: it is the state
    # machine of a live run; rebuilt from the broker's order book if lost.
    return _tagged(f"runtime:{_id(strategy_id)}", strategy_id)


def symbol_strategies_key(symbol: str, partition: int = 0) -> str:
    """Return `symbol:<SYM>:strategies:{tag}`: SYM's running strategies of one partition."""
    # SET of ids of running strategies on SYM whose partition is `partition`
    # (start/stop scripts write it with the strategy's keys), read by the market
    # listener. No TTL: membership follows start/stop, not time.
    return f"symbol:{_symbol(symbol)}:strategies:{partition_tag(partition)}"


def symbol_strategies_pattern() -> str:
    """Return the SCAN pattern of every symbol set of every partition."""
    return "symbol:*:strategies:*"


def strategy_key_pattern() -> str:
    """Return the SCAN pattern of every `strategy:` key of every partition."""
    return "strategy:*"


def price_key(symbol: str) -> str:
    """Return `price:{SYM}`."""
    # STRING, last traded price. Overwritten on every tick; no TTL because a
    # stale price is still the best one known (readers check the age elsewhere).
    return f"price:{_symbol(symbol)}"


def lock_key(strategy_id: Id) -> str:
    """Return `lock_state:<id>:{tag}` (tag: the strategy's partition)."""
    # STRING, owner token of the executor working on the strategy. Set with
    # PX so a crashed executor's lock expires instead of blocking the strategy.
    return _tagged(f"lock_state:{_id(strategy_id)}", strategy_id)


# TTL of the per-run markers below (stop-loss fired, exit attempted, square-off
# requested) and of the per-day token-check mark: two days outlives any run (one
# trading day) and its last late event; the run_id or day in the name already
# scopes each one, so the TTL only cleans up.
RUN_MARKER_TTL_S = 172_800


def stoploss_marker_key(strategy_id: Id, run_id: str) -> str:
    """Return `stoploss:fired:<id>:<run_id>:{tag}` (tag: the strategy's partition)."""
    # STRING set NX when a listener fires STOPLOSS: one per strategy run. EX of the
    # listener's stoploss_marker_ttl_s (RUN_MARKER_TTL_S by default).
    return _tagged(f"stoploss:fired:{_id(strategy_id)}:{run_id}", strategy_id)


def exit_attempt_key(strategy_id: Id, run_id: str) -> str:
    """Return `exit:attempted:<id>:<run_id>:{tag}` (tag: the strategy's partition)."""
    # STRING set by the executor just before it sends a run's exit order, so any
    # later exit event (another executor, after a crash) looks the exit tag up
    # at the broker before placing. EX RUN_MARKER_TTL_S.
    return _tagged(f"exit:attempted:{_id(strategy_id)}:{run_id}", strategy_id)


def entry_unsent_key(strategy_id: Id, run_id: str) -> str:
    """Return `entry:unsent:<id>:<run_id>:{tag}` (tag: the strategy's partition)."""
    # STRING set when a start loads a new run (its run_id is new: no order of it can
    # be at the broker) and deleted by the first entry event that takes the lock. Only
    # the event that deletes it may send the entry without searching the order book
    # for its tag first. Executors delete every one (SCAN entry_unsent_pattern) when
    # Redis may have lost writes, since a lost DEL would bring one back. EX RUN_MARKER_TTL_S.
    return _tagged(f"entry:unsent:{_id(strategy_id)}:{run_id}", strategy_id)


def entry_unsent_pattern() -> str:
    """Return the SCAN pattern of every `entry:unsent:` key of every partition."""
    return "entry:unsent:*"


def square_off_marker_key(strategy_id: Id, run_id: str) -> str:
    """Return `squareoff:requested:{id}:{run_id}`."""
    # STRING set by the API in the same step that enqueues a square-off SELL: the
    # executor refuses a square-off it cannot find this marker for (a SELL forged
    # into the stream must not close a position early). EX RUN_MARKER_TTL_S.
    return _tagged(f"squareoff:requested:{_id(strategy_id)}:{run_id}", strategy_id)


def state_marker_key(partition: int) -> str:
    """Return `tickwise:state:{tag}`."""
    # STRING written by the scheduler after each rebuild from Postgres, one per
    # partition (in a cluster each lives on its partition's master). Its absence
    # while Redis's run_id is unchanged means Redis lost that data (FLUSHALL, an
    # empty replica promoted): rebuild. No TTL: it must outlive what it vouches for.
    return f"tickwise:state:{partition_tag(partition)}"


STATE_MARKER = state_marker_key(0)


# STRING set and cleared by an operator with redis-cli (`SET tickwise:halt "<reason>"`,
# `DEL tickwise:halt`): while it exists executors place no new entries (BUYs are
# skipped with the reason), exits still go out. No TTL: a halt lasts until cleared.
OPERATOR_HALT = "tickwise:halt"


# --- scheduling ---------------------------------------------------------------

def schedule_key(partition: int) -> str:
    """Return `schedule:{tag}`."""
    # ZSET, member = canonical JSON of a due event of this partition's strategies,
    # score = epoch ms due. No TTL: members leave when moved to the partition's
    # orders stream or when their strategy stops.
    return f"schedule:{partition_tag(partition)}"


SCHEDULE = schedule_key(0)

# Pub/sub channel, published to whenever SCHEDULE gains an earlier member, so
# sleeping schedulers wake up early. Pub/sub holds nothing, so no TTL.
SCHEDULE_WAKEUP_CHANNEL = "schedule:wakeup"


# --- streams and consumer groups ----------------------------------------------
# Every stream's bound is defined here once: CONTROL_MAXLEN, DEAD_MAXLEN and
# NOTIFY_MAXLEN are approximate (XADD MAXLEN ~); queue:orders has none (the
# scheduler trims it by MINID), queue:order_logs none (the writer deletes each
# entry once it is in Postgres).

# Each stream below exists once per partition; the constant names partition 0's.

def orders_stream(partition: int) -> str:
    """Return `queue:orders:{tag}`."""
    # STREAM, field `event` = JSON of an event of this partition's strategies;
    # consumed by EXECUTORS_GROUP (one group per partition's stream). No TTL; the
    # scheduler trims it (XTRIM MINID) below every group's last delivered-and-acked
    # entry, because acked entries are history only.
    return f"queue:orders:{partition_tag(partition)}"


def orders_dead_stream(partition: int) -> str:
    """Return `queue:orders:dead:{tag}`."""
    # STREAM of events malformed, refused or delivered too often: fields event,
    # reason, msg_id, deliveries. Kept for humans to inspect; trimmed with
    # DEAD_MAXLEN, no TTL.
    return f"queue:orders:dead:{partition_tag(partition)}"


def order_logs_stream(partition: int) -> str:
    """Return `queue:order_logs:{tag}`."""
    # STREAM, field `row` = JSON of an OrderLogRow; consumed by LOG_WRITERS_GROUP.
    # No TTL: rows must wait here through a Postgres outage.
    return f"queue:order_logs:{partition_tag(partition)}"


def order_logs_dead_stream(partition: int) -> str:
    """Return `queue:order_logs:dead:{tag}`."""
    # STREAM of order-log rows the writer could not parse or Postgres refused for
    # good: fields row, reason, msg_id. Kept for inspection; trimmed with
    # DEAD_MAXLEN, no TTL.
    return f"queue:order_logs:dead:{partition_tag(partition)}"


def control_stream(partition: int) -> str:
    """Return `control:strategies:{tag}`."""
    # STREAM, field `event` = JSON of a ControlMessage (started/stopped/position)
    # about this partition's strategies, telling market listeners what to watch.
    # Trimmed with CONTROL_MAXLEN, no TTL.
    return f"control:strategies:{partition_tag(partition)}"


ORDERS_STREAM = orders_stream(0)
ORDERS_DEAD_STREAM = orders_dead_stream(0)
ORDER_LOGS_STREAM = order_logs_stream(0)
ORDER_LOGS_DEAD_STREAM = order_logs_dead_stream(0)
CONTROL_STREAM = control_stream(0)

# Approximate MAXLEN of each control_stream: listeners read it live and rebuild from
# a scan at start, so only recent entries matter; 100k covers hours of churn.
CONTROL_MAXLEN = 100_000

# Approximate MAXLEN of each dead-letter stream (orders_dead_stream,
# order_logs_dead_stream, notify_dead_stream): kept for humans, bounded so a
# flood cannot fill Redis.
DEAD_MAXLEN = 100_000


# STRING: the Redis server identity (`libs.service.redis_client.server_run_id`) the
# executors last reconciled against, no TTL. An executor starting against another
# (restarted, failed over, flushed) cannot trust the per-run attempt markers and
# reconciles as after a loss (services.executor.reconcile). Read alone: no tag.
REDIS_EPOCH = "executor:redis_epoch"


def consumer_alive_key(consumer: str) -> str:
    """Return `executor:alive:{consumer}`."""
    # STRING heartbeat of one executor consumer, SET with a PX of a few seconds and
    # renewed well within it. Gone means the consumer is dead: the entries it holds
    # pending are claimed at once instead of after the idle timeout. Read alone
    # (no script), so it needs no partition tag.
    return f"executor:alive:{consumer}"


# Consumer group of executors on ORDERS_STREAM.
EXECUTORS_GROUP = "executors"

# Consumer group of Postgres writers on ORDER_LOGS_STREAM.
LOG_WRITERS_GROUP = "log-writers"


# --- notifications ------------------------------------------------------------
# Per partition, like the order path's streams: the executor's commit script
# XADDs a strategy's notice to its partition's stream (one slot), and each
# partition's deliveries are scheduled and dead-lettered beside it, so every
# MULTI of the deliverer names one slot too.

def notify_stream(partition: int) -> str:
    """Return `notify:events:{tag}`."""
    # STREAM, field `notice` = JSON of a Notice (order filled, run failed, token
    # expired, kill switch); consumed by NOTIFIERS_GROUP. Trimmed with
    # NOTIFY_MAXLEN: an entry is only a hand-over, acked and deleted once fanned
    # out into notify_schedule(partition).
    return f"notify:events:{partition_tag(partition)}"


def notify_schedule(partition: int) -> str:
    """Return `notify:schedule:{tag}`."""
    # ZSET of deliveries, member = "{notice_id}|{channel}", score = epoch ms when
    # the next attempt is due; a claimed member is pushed one lease ahead, so a
    # crashed deliverer's attempt is retried by another. No TTL: members leave on
    # success or when dead-lettered.
    return f"notify:schedule:{partition_tag(partition)}"


def notify_pending(partition: int) -> str:
    """Return `notify:pending:{tag}`."""
    # HASH member -> JSON {notice, channel, attempt} of every delivery in
    # notify_schedule(partition). No TTL, for the same reason.
    return f"notify:pending:{partition_tag(partition)}"


def notify_dead_stream(partition: int) -> str:
    """Return `notify:dead:{tag}`."""
    # STREAM of deliveries given up after the attempt limit, with the last
    # error; kept for humans to inspect. Trimmed with DEAD_MAXLEN, no TTL.
    return f"notify:dead:{partition_tag(partition)}"


NOTIFY_STREAM = notify_stream(0)
NOTIFY_SCHEDULE = notify_schedule(0)
NOTIFY_PENDING = notify_pending(0)
NOTIFY_DEAD_STREAM = notify_dead_stream(0)
# Approximate MAXLEN of each notify_stream: entries are acked and deleted once fanned
# out, so this only bounds a backlog while no deliverer runs.
NOTIFY_MAXLEN = 100_000

# Consumer group of notification deliverers (API processes) on each notify_stream.
NOTIFIERS_GROUP = "notifiers"


# --- broker limits and caches -------------------------------------------------

def order_rate_key(api_key_fp: str) -> str:
    """Return `ratelimit:orders:<fp>:{tag}` for a Kite api_key fingerprint (tag: the fp's partition)."""
    # Rate limiter shared by all executors for one Kite api_key: a ZSET log of
    # order times over a rolling window (Kite counts per rolling second, which a
    # refilling token bucket overshoots). Keyed by the fingerprint so the key
    # itself never appears in Redis. PX TTL of one window: idle means empty.
    # One key per account whatever N is (the limit is the account's): a script
    # may take a slot together with a strategy's keys only when their tags agree.
    return _tagged(f"ratelimit:orders:{api_key_fp}", api_key_fp)


def instruments_key(exchange: str, day: date | str) -> str:
    """Return `instruments:{EXCHANGE}:{yyyy-mm-dd}`."""
    # HASH symbol -> instrument_token for one trading day. Tokens can change
    # between days, so the day is in the name; EX INSTRUMENTS_TTL_S only cleans up.
    day_text = day.isoformat() if isinstance(day, date) else day
    return f"instruments:{exchange.strip().upper()}:{day_text}"


# TTL of an instruments:{EXCHANGE}:{day} hash: two days, so a day's map outlives the day.
INSTRUMENTS_TTL_S = 2 * 86_400


def broker_credentials_key(user_id: Id) -> str:
    """Return `broker:<user_id>:{tag}` (tag: the user's partition)."""
    # HASH api_key, access_token (AES-GCM ciphertexts copied verbatim from
    # Postgres), api_key_fp, is_valid ("1"/"0"), token_state (the broker's last
    # answer about the token: valid/expired/unknown): the order path's credentials,
    # written by the API on connect/session/start. No TTL: Postgres is the
    # source and every start rewrites it. Read together with a strategy's keys
    # only when their tags agree (always with N = 1).
    return _tagged(f"broker:{_id(user_id)}", user_id)


# --- API login throttling -----------------------------------------------------

# Both counters of one login attempt change in one MULTI, so in a cluster they
# must share a slot: every throttle key carries this one fixed tag (tiny, rare writes).
_THROTTLE_TAG = "{throttle}"


def login_throttle_email_key(email_digest: str) -> str:
    """Return `throttle:login:email:<digest>:{throttle}`."""
    # STRING counter of failed logins for one account, EX 60: a short window
    # slows guessing without locking a user out for long. A digest, not the
    # address, so Redis holds no personal data.
    return f"throttle:login:email:{email_digest}:{_THROTTLE_TAG}"


def login_throttle_addr_key(addr: str) -> str:
    """Return `throttle:login:addr:<addr>:{throttle}`."""
    # STRING counter of failed logins from one client address, EX 60, for the
    # same reason as the per-email counter.
    return f"throttle:login:addr:{addr}:{_THROTTLE_TAG}"


def login_throttle_pair_key(email_digest: str, addr: str) -> str:
    """Return `throttle:login:pair:<digest>:<addr>:{throttle}`."""
    # STRING counter of failed logins for one account from one address, EX of the
    # login window: guessing from one place is slowed without locking the owner
    # (who logs in from elsewhere) out.
    return f"throttle:login:pair:{email_digest}:{addr}:{_THROTTLE_TAG}"


def register_throttle_addr_key(addr: str) -> str:
    """Return `throttle:register:addr:<addr>:{throttle}`."""
    # STRING counter of registrations from one client address, EX of the
    # registration window: each one costs an argon2 hash.
    return f"throttle:register:addr:{addr}:{_THROTTLE_TAG}"


# --- API sessions -------------------------------------------------------------

def revoked_token_key(jti: str) -> str:
    """Return `auth:revoked:<jti>`."""
    # STRING, a logged-out access token's id. EX = the token's remaining
    # lifetime: once it has expired anyway there is nothing left to deny.
    return f"auth:revoked:{jti}"


def token_version_key(user_id: Id) -> str:
    """Return `auth:token_version:{user_id}`."""
    # STRING, cache of users.token_version (bumped by a password change or account
    # deletion, which revokes every older token). EX TOKEN_VERSION_TTL_S; read through
    # to Postgres when missing, so losing it only costs one query.
    return f"auth:token_version:{_id(user_id)}"


# TTL of auth:token_version:{user_id}: an hour. A password change writes the new
# version at once, so the TTL only bounds what another process may have cached.
TOKEN_VERSION_TTL_S = 3_600


# --- the Kite session's daily life --------------------------------------------

def broker_login_state_key(nonce: str) -> str:
    """Return `broker:login:state:<nonce>` (no hash tag: a single-key SET NX)."""
    # STRING set NX by the login callback when it accepts a state: a replayed state
    # finds it and is refused. EX a little past the state's own lifetime, after
    # which the signature's expiry refuses it anyway.
    return f"broker:login:state:{nonce}"


def token_check_key(user_id: Id, day: date | str) -> str:
    """Return `token:checked:<user_id>:<yyyy-mm-dd>` (no hash tag: a single-key SET NX)."""
    # STRING set NX by the scheduler that runs a user's pre-open token check on a
    # trading day, so replicas neither check nor notify twice. EX RUN_MARKER_TTL_S:
    # the day is in the name, the TTL only cleans up.
    day_text = day.isoformat() if isinstance(day, date) else day
    return f"token:checked:{_id(user_id)}:{day_text}"
