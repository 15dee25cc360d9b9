"""Run the Kite Connect simulator: `python -m services.kite_sim --port N`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import structlog
from aiohttp import web

from services.kite_sim.app import SimSettings, build_app


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
    p.add_argument("--depth-quantity", type=int, default=500, help="average shares per depth level")
    p.add_argument("--market-calendar", choices=("always_open", "nse"), default="always_open",
                   help="nse blocks MIS orders from 15:20 IST")
    p.add_argument("--clock-offset-s", type=float, default=0.0, help="shift of the simulator's clock")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def configure_logging(level: str) -> None:
    """Log JSON lines; the simulator logs no tokens or secrets."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    )


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
    )
    structlog.get_logger("kite_sim").info("kite sim starting", host=args.host, port=args.port, seed=args.seed)
    # No access log: benchmarks push thousands of requests and it would dominate.
    web.run_app(build_app(settings), host=args.host, port=args.port, access_log=None,
                shutdown_timeout=2.0, print=None)


if __name__ == "__main__":
    main()
