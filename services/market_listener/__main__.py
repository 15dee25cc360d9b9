"""Run the market listener: `python -m services.market_listener`.

Contract: while a strategy is `bought`, the first tick at or below its
stop_loss emits exactly one STOPLOSS (per strategy run, across any number of
replicas) on `queue:orders`, carrying `trigger_price` and the run's
`trading_day` (so it shares the SELL's exit tag at the broker).

How the stop-loss index stays in sync: through the partitions'
`control:strategies` streams, not keyspace notifications. The executor's commit
script XADDs a `position` message in the same script that HSETs the runtime
position, and load_run/unload_run's scripts add `started`/`stopped`, so every
change arrives once, in order, with the fields needed (symbol, stop_loss,
run_id) and nothing to read back. Notifications are fire-and-forget (lost
while disconnected), would need a server config change, and would force a read
per change. At start the listener notes each stream's last id, scans
`symbol:*:strategies`, `strategy:{id}` and `runtime:{id}`, then reads control
messages from those ids: a change made during the scan is applied again, which
is harmless (every message is idempotent), and none is missed. (tracker.py)

Hot path (pump.py): the feed reads Kite's ticker WebSocket on this loop (no
thread) and hands over each frame; the pump updates the latest prices, checks
each symbol's highest stop-loss (one comparison when nothing fires) and pops
triggered watches with one bisect. Only a trigger costs a Redis round trip
(marker + XADD in one script, started at once; a frame's triggers run
concurrently); `price:{SYM}` is written by a separate loop, one MSET, at most
every price_write_interval_s.

The feed (feed.py): one market-data account's ticker in LTP mode, reconnecting
on its own. The watchdog (watchdog.py) reconnects when no tick arrives for
watchdog_silence_s while the market is open, and exits non-zero after
watchdog_max_attempts reconnects in a row (the supervisor restarts the
process). An expired token (403) is logged as critical and reported by /healthz
as `{"ok": false, "feed": "token_expired"}` (503); the process stays up so the
state is visible.
"""

from __future__ import annotations

import asyncio
import sys

from libs.broker.kite import KiteGateway
from libs.service.health import HealthServer
from libs.service.lifecycle import Shutdown, supervise
from libs.service.logging import configure_logging, get_logger, register_secret
from libs.service.redis_client import connect_redis
from libs.trading.calendar import MarketCalendar
from services.market_listener.service import FeedLost, MarketListener
from services.market_listener.settings import ListenerSettings


async def serve(settings: ListenerSettings) -> int:
    """Run until SIGTERM (0) or a lost feed (2); return the exit code."""
    log = get_logger("market_listener")
    register_secret(settings.market_data_access_token)
    shutdown = Shutdown()
    shutdown.install()
    redis = connect_redis(settings, health_check_interval=5)
    gateway = KiteGateway(root=settings.kite_root, max_workers=2)
    listener = MarketListener(settings, redis, gateway, MarketCalendar(settings.market_calendar))

    async def redis_ready() -> None:
        await redis.ping()

    health = HealthServer(settings.health_host, settings.health_port, service="market_listener",
                          checks={"redis": redis_ready}, probe=listener.health)
    port = await health.start()
    log.info("market listener started", health_port=port, ws_root=settings.kite_ws_root)
    try:
        code = await supervise(listener.run(), listener.stop, shutdown, name="listener",
                               grace_s=settings.shutdown_grace_s, log=log,
                               exits={FeedLost: (2, "feed lost; exiting for the supervisor to restart")})
    finally:
        await health.stop()
        await redis.aclose()
        gateway.close()
    log.info("market listener stopped", fired=listener.fired_total, watched=len(listener.index),
             symbols=len(listener.members), signal=shutdown.signal_name, exit_code=code)
    return code


def main() -> None:
    """Read settings once, configure logging, run."""
    settings = ListenerSettings()
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
