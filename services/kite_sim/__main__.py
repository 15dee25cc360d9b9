"""Run the Kite Connect simulator: `python -m services.kite_sim --port N`.

Upstream live prices: `--upstream-api-key`, `--upstream-ws-url` (and
`--upstream-root` to serve historical data from the upstream) with the access
token from `KITE_SIM_UPSTREAM_ACCESS_TOKEN` (a flag would show it in `ps`);
each flag also reads its `KITE_SIM_UPSTREAM_*` variable.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from pathlib import Path

import structlog
import uvloop
from aiohttp import web

from services.kite_sim.app import HANDLER_ARGS, SimSettings, build_app
from services.kite_sim.portfolio import DEFAULT_OPENING_CASH
from services.kite_sim.upstream import UpstreamConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m services.kite_sim", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slippage-bps", type=float, default=0.0)
    p.add_argument("--tick-interval-ms", type=float, default=1000.0, help="random walk period; 0 = off")
    p.add_argument("--walk-bps", type=float, default=5.0, help="random walk step size (std dev)")
    p.add_argument("--replay", type=Path, default=None, help="CSV ts_offset_ms,symbol,last_price")
    p.add_argument("--replay-loop", action="store_true")
    p.add_argument("--orders-per-second", type=int, default=10)
    p.add_argument("--daily-order-cap", type=int, default=3000)
    p.add_argument("--hold-seconds", type=float, default=60.0, help="timeout-after-accept hold")
    p.add_argument("--opening-cash", type=float, default=DEFAULT_OPENING_CASH,
                   help="equity cash of every new paper account (rupees)")
    p.add_argument("--state-file", type=Path, default=None,
                   help="keep accounts, tokens, orders and positions in this file across restarts")
    env = os.environ
    p.add_argument("--upstream-api-key", default=env.get("KITE_SIM_UPSTREAM_API_KEY"),
                   help="take live prices from this Kite account's ticker instead of the walk")
    p.add_argument("--upstream-access-token", default=env.get("KITE_SIM_UPSTREAM_ACCESS_TOKEN"),
                   help="prefer the KITE_SIM_UPSTREAM_ACCESS_TOKEN variable")
    p.add_argument("--upstream-ws-url", default=env.get("KITE_SIM_UPSTREAM_WS_URL"),
                   help="KiteTicker root (default: Kite's own); e.g. ws://127.0.0.1:8765/ws for another simulator")
    p.add_argument("--upstream-root", default=env.get("KITE_SIM_UPSTREAM_ROOT"),
                   help="upstream Kite REST root (e.g. https://api.kite.trade) to serve historical_data from")
    p.add_argument("--depth-quantity", type=int, default=500, help="average shares per depth level")
    p.add_argument("--market-calendar", choices=("always_open", "nse"), default="always_open",
                   help="nse blocks MIS orders from 15:20 IST")
    p.add_argument("--clock-offset-s", type=float, default=0.0, help="shift of the simulator's clock")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if bool(args.upstream_api_key) != bool(args.upstream_access_token):
        p.error("upstream prices need both an api key and an access token")
    if (args.upstream_ws_url or args.upstream_root) and not args.upstream_api_key:
        p.error("--upstream-ws-url and --upstream-root need --upstream-api-key and its access token")
    return args


def configure_logging(level: str) -> None:
    """Log JSON lines; the simulator logs no tokens or secrets."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    )


GC_THRESHOLDS = (50_000, 20, 10)
"""Young-generation size and collection ratios of the cyclic garbage collector (CPython's are 700, 10, 10)."""


def settle_garbage_collector() -> None:
    """Freeze what start-up built and collect less often: the book only grows, so most collections find nothing.

    Requests free their objects by reference counting; what survives is the
    day's orders, which the default thresholds traverse again and again (about
    a tenth of the simulator's CPU under the order benchmarks).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: list[str] | None = None) -> None:
    """Run until SIGINT/SIGTERM."""
    args = parse_args(argv)
    configure_logging(args.log_level)
    settings = SimSettings(
        seed=args.seed, slippage_bps=args.slippage_bps, tick_interval_ms=args.tick_interval_ms,
        walk_bps=args.walk_bps, replay=args.replay, replay_loop=args.replay_loop,
        orders_per_second=args.orders_per_second, daily_order_cap=args.daily_order_cap,
        hold_seconds=args.hold_seconds, depth_quantity=args.depth_quantity,
        market_calendar=args.market_calendar, clock_offset_s=args.clock_offset_s,
        opening_cash=args.opening_cash, state_file=args.state_file,
        upstream=UpstreamConfig(args.upstream_api_key, args.upstream_access_token, args.upstream_ws_url,
                                args.upstream_root) if args.upstream_api_key else None,
    )
    structlog.get_logger("kite_sim").info("kite sim starting", host=args.host, port=args.port, seed=args.seed,
                                          state_file=str(args.state_file) if args.state_file else None,
                                          upstream=bool(settings.upstream))
    app = build_app(settings)
    settle_garbage_collector()
    # No access log: benchmarks push thousands of requests and it would dominate.
    # uvloop: libuv's loop and transports in C: ~8% less simulator CPU per order, ~20% per bare request.
    web.run_app(app, host=args.host, port=args.port, access_log=None,
                shutdown_timeout=2.0, print=None, loop=uvloop.new_event_loop(), **HANDLER_ARGS)


if __name__ == "__main__":
    main()
