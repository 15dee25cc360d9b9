"""Wire the simulator: market, book, portfolio, faults, tick hub, REST, admin, WebSocket, state file, upstream."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from libs.service.clock import OffsetClock
from libs.service.health import HealthServer
from libs.trading.calendar import CalendarMode
from services.kite_sim.admin import AdminApi
from services.kite_sim.book import Book
from services.kite_sim.faults import Faults
from services.kite_sim.login import KiteLogin
from services.kite_sim.market import DATA_FILE, Market, load_instruments, load_replay, run_replay, run_walk
from services.kite_sim.order_rules import OrderRules
from services.kite_sim.portfolio import DEFAULT_OPENING_CASH, Portfolio, PortfolioApi
from services.kite_sim.postbacks import OrderUpdates
from services.kite_sim.quotes import QuotesApi
from services.kite_sim.rest import KiteRest
from services.kite_sim.store import StateStore
from services.kite_sim.ticks import TickHub, make_ticker_handler
from services.kite_sim.upstream import CONNECTED, UpstreamConfig, UpstreamFeed, UpstreamHistory

log = structlog.get_logger("kite_sim")


@dataclass(frozen=True, slots=True)
class SimSettings:
    """Simulator settings; defaults suit a local paper-trading run."""

    seed: int = 1
    """Seed of the random walk and of fault draws."""
    slippage_bps: float = 0.0
    """MARKET fills: BUY pays last*(1+bps), SELL receives last*(1-bps)."""
    tick_interval_ms: float = 1000.0
    """Random walk period; 0 turns the walk off (prices move only via /sim/ticks)."""
    walk_bps: float = 5.0
    """Standard deviation of one random-walk step, in basis points."""
    replay: Path | None = None
    """CSV (ts_offset_ms,symbol,last_price) replayed instead of the walk."""
    replay_loop: bool = False
    """Start the replay over when it ends."""
    orders_per_second: int = 10
    """Kite's per-account order rate limit."""
    daily_order_cap: int = 3000
    """Default per-account daily order cap."""
    hold_seconds: float = 60.0
    """How long timeout-after-accept holds a response (unless faults change)."""
    instruments_file: Path = DATA_FILE
    """Instruments dump; its last_price column gives the base prices."""
    depth_quantity: int = 500
    """Average shares at each of the five depth levels; larger orders fill across levels."""
    market_calendar: CalendarMode = "always_open"
    """`always_open` accepts MIS orders at any hour; `nse` blocks them from 15:20 IST."""
    clock_offset_s: float = 0.0
    """Shift of the simulator's clock (order times, MIS cutoff) from the wall clock."""
    opening_cash: float = DEFAULT_OPENING_CASH
    """Equity cash every new paper account starts with (rupees)."""
    state_file: Path | None = None
    """Where accounts, tokens, orders, trades and positions are kept across restarts; None keeps nothing."""
    upstream: UpstreamConfig | None = None
    """Take prices from this KiteTicker (live Kite or another simulator) instead of the walk or replay."""


HANDLER_ARGS = {"max_line_size": 128 * 1024, "max_field_size": 128 * 1024}
"""Kite takes up to 1000 `i=` instruments in one GET; aiohttp's default request line is 8 KiB."""

MARKET_KEY = web.AppKey("market", Market)
BOOK_KEY = web.AppKey("book", Book)
FAULTS_KEY = web.AppKey("faults", Faults)
HUB_KEY = web.AppKey("hub", TickHub)
UPDATES_KEY = web.AppKey("updates", OrderUpdates)
SETTINGS_KEY = web.AppKey("settings", SimSettings)
STORE_KEY = web.AppKey("store", StateStore)
UPSTREAM_KEY = web.AppKey("upstream", UpstreamFeed)
HISTORY_KEY = web.AppKey("upstream_history", UpstreamHistory)


class SimCollector(Collector):
    """Report the simulator's counters at scrape time (nothing is counted on the hot paths)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        """Return the current figures."""
        app = self.app
        book, hub = app[BOOK_KEY], app[HUB_KEY]
        out: list[GaugeMetricFamily | CounterMetricFamily] = [
            GaugeMetricFamily("kite_sim_accounts", "Paper accounts.", value=len(book.accounts)),
            GaugeMetricFamily("kite_sim_orders", "Orders in the book.", value=len(book.orders)),
            GaugeMetricFamily("kite_sim_ws_connections", "Ticker WebSocket connections.", value=len(hub.connections)),
            CounterMetricFamily("kite_sim_tick_frames_sent", "Tick frames queued to connections.",
                                value=hub.frames_sent),
        ]
        store = app.get(STORE_KEY)
        if store is not None:
            out.append(CounterMetricFamily("kite_sim_state_writes", "State file writes.", value=store.writes))
        upstream = app.get(UPSTREAM_KEY)
        if upstream is not None:
            out.append(CounterMetricFamily("kite_sim_upstream_ticks", "Ticks taken from upstream.",
                                           value=upstream.ticks))
            out.append(GaugeMetricFamily("kite_sim_upstream_connected", "1 while the upstream ticker is connected.",
                                         value=int(upstream.state == CONNECTED)))
        return out


def health_server(app: web.Application) -> HealthServer:
    """Build /healthz (with counters), /readyz (upstream, state file) and /metrics for the app."""

    def probe() -> dict[str, object]:
        return {"pid": os.getpid(), "accounts": len(app[BOOK_KEY].accounts), "orders": len(app[BOOK_KEY].orders),
                "ws_connections": len(app[HUB_KEY].connections)}

    async def upstream_connected() -> None:
        if app[UPSTREAM_KEY].state != CONNECTED:
            raise ConnectionError(app[UPSTREAM_KEY].state)

    async def state_file_written() -> None:
        if app[STORE_KEY].last_error:
            raise OSError(app[STORE_KEY].last_error)

    checks = {}
    if UPSTREAM_KEY in app:
        checks["upstream"] = upstream_connected
    if STORE_KEY in app:
        checks["state_file"] = state_file_written
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SimCollector(app))
    return HealthServer("", 0, service="kite_sim", checks=checks, probe=probe, registry=registry)


@web.middleware
async def mark_state_dirty(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """Note every mutating request for the state file, before (a held answer) and after it."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return await handler(request)
    store = request.app[STORE_KEY]
    store.mark_dirty()
    try:
        return await handler(request)
    finally:
        store.mark_dirty()


ERROR_TYPES = {400: "InputException", 403: "TokenException", 429: "NetworkException"}


async def errors_as_kite(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """Answer unknown routes, unsupported methods and other HTTP errors in Kite's error envelope."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPNotFound):
            message = "Route not found"
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            message = f"Method {request.method} not allowed on this route"
        else:
            message = exc.text or exc.reason
        body = {"status": "error", "error_type": ERROR_TYPES.get(exc.status, "GeneralException"),
                "message": message, "data": None}
        return web.Response(status=exc.status, body=orjson.dumps(body), content_type="application/json")


async def background_tasks(app: web.Application) -> AsyncIterator[None]:
    """Own the price source and heartbeat tasks for the app's lifetime."""
    settings, market, hub = app[SETTINGS_KEY], app[MARKET_KEY], app[HUB_KEY]
    tasks = [asyncio.create_task(hub.run_heartbeat(), name="heartbeat"),
             asyncio.create_task(app[BOOK_KEY].run_refills(), name="refills"),
             asyncio.create_task(app[UPDATES_KEY].run(), name="postbacks")]
    store = app.get(STORE_KEY)
    if store is not None:
        tasks.append(asyncio.create_task(store.run(), name="state-store"))
    upstream = app.get(UPSTREAM_KEY)
    if upstream is not None:
        upstream.start(asyncio.get_running_loop())
    elif settings.replay is not None:
        steps = load_replay(settings.replay, market)
        tasks.append(asyncio.create_task(run_replay(market, steps, settings.replay_loop), name="replay"))
    elif settings.tick_interval_ms > 0:
        tasks.append(asyncio.create_task(run_walk(market, settings.tick_interval_ms / 1000), name="walk"))
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if upstream is not None:
        upstream.close()
    if HISTORY_KEY in app:
        await app[HISTORY_KEY].close()
    if store is not None:
        try:
            store.save()
        except OSError as exc:
            log.error("state not saved at shutdown", path=str(store.path), error=str(exc))
        else:
            log.info("state saved", path=str(store.path), accounts=len(app[BOOK_KEY].accounts))


async def release_on_shutdown(app: web.Application) -> None:
    """Let held requests answer and close ticker sockets so shutdown is quick."""
    app[FAULTS_KEY].release_held()
    await app[HUB_KEY].close_all()


def build_app(settings: SimSettings | None = None) -> web.Application:
    """Build the simulator application."""
    settings = settings or SimSettings()
    market = Market(load_instruments(settings.instruments_file), seed=settings.seed, walk_bps=settings.walk_bps)
    book = Book(market, slippage_bps=settings.slippage_bps, orders_per_second=settings.orders_per_second,
                daily_order_cap=settings.daily_order_cap, depth_quantity=settings.depth_quantity,
                seed=settings.seed, clock=OffsetClock(settings.clock_offset_s))
    portfolio = Portfolio(market, book, opening_cash=settings.opening_cash)
    faults = Faults(seed=settings.seed, hold_seconds=settings.hold_seconds)
    hub = TickHub(market, book.liquidity)
    updates = OrderUpdates(hub)
    book.add_order_listener(updates.announce)
    middlewares = [web.middleware(errors_as_kite)]
    store = None
    if settings.state_file is not None:
        store = StateStore(settings.state_file, market, book, portfolio)
        store.load()
        middlewares.append(mark_state_dirty)
    app = web.Application(middlewares=middlewares)
    app[SETTINGS_KEY], app[MARKET_KEY], app[BOOK_KEY], app[FAULTS_KEY], app[HUB_KEY], app[UPDATES_KEY] = (
        settings, market, book, faults, hub, updates)
    if store is not None:
        app[STORE_KEY] = store
    history = None
    if settings.upstream is not None:
        app[UPSTREAM_KEY] = UpstreamFeed(settings.upstream, market)
        if settings.upstream.root:
            history = app[HISTORY_KEY] = UpstreamHistory(settings.upstream)
    app.router.add_get("/ws", make_ticker_handler(hub, book.authenticate))
    rules = OrderRules(market, book, calendar=settings.market_calendar)
    app.router.add_routes(KiteRest(market, book, faults, rules).routes())
    app.router.add_routes(QuotesApi(market, book, faults, rules, history).routes())
    app.router.add_routes(PortfolioApi(market, book, faults, portfolio).routes())
    app.router.add_routes(AdminApi(market, book, faults, hub).routes())
    app.router.add_routes(KiteLogin(book).routes())
    app.router.add_routes(health_server(app).routes())
    app.cleanup_ctx.append(background_tasks)
    app.on_shutdown.append(release_on_shutdown)
    return app


async def start_sim(host: str = "127.0.0.1", port: int = 0, **opts: object) -> web.AppRunner:
    """Start the simulator in this event loop; `await runner.cleanup()` stops it.

    `opts` are SimSettings fields. With port 0 the bound port is in
    `runner.addresses`.
    """
    settings = SimSettings(**opts)  # type: ignore[arg-type]
    runner = web.AppRunner(build_app(settings), access_log=None, shutdown_timeout=2.0, **HANDLER_ARGS)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("kite sim started", host=host, port=port, seed=settings.seed)
    return runner
