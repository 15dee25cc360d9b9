"""Build the aiohttp application: resources owned by cleanup contexts, middlewares, routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from libs.broker.kite import KiteGateway
from libs.schema.migrate import sync_database_url
from libs.service.health import HealthServer
from libs.service.redis_client import connect_redis
from libs.service.secretbox import SecretBox
from libs.trading.calendar import MarketCalendar
from services.api.deps import (
    BOX,
    CALENDAR,
    ENGINE,
    GATEWAY,
    PASSWORDS,
    READS,
    REDIS,
    REGISTER_THROTTLE,
    SESSIONS,
    SETTINGS,
    THROTTLE,
    TOKENS,
)
from services.api.errors import error_middleware
from services.api.instruments import INSTRUMENTS_LOCK
from services.api.live import CLOSING, TICKETS, StreamTickets, close_streams
from services.api.metrics import METRICS, ApiMetrics, request_context_middleware
from services.api.notify import notifier_ctx
from services.api.openapi import add_routes
from services.api.routes import OPENAPI, openapi_document, ops
from services.api.security import (
    LoginThrottle,
    Passwords,
    RegisterThrottle,
    Tokens,
    build_secretbox,
    jwt_secret,
)
from services.api.settings import ApiSettings


def build_app(settings: ApiSettings, *, box: SecretBox | None = None) -> web.Application:
    """Return the API app; raises MissingSecretKey without a key outside dev mode."""
    box = box or build_secretbox(settings)
    app = web.Application(client_max_size=settings.client_max_size,
                          middlewares=[request_context_middleware, error_middleware])
    app[SETTINGS] = settings
    app[BOX] = box
    app[CALENDAR] = MarketCalendar(settings.market_calendar, sell_safety_margin_s=settings.sell_safety_margin_s)
    secret = jwt_secret(settings, settings.secret_key or None)
    app[TOKENS] = Tokens(secret, settings.jwt_lifetime_s)
    app[TICKETS], app[CLOSING] = StreamTickets(secret, settings.stream_ticket_ttl_s), asyncio.Event()
    app.on_shutdown.append(close_streams)
    app[INSTRUMENTS_LOCK] = asyncio.Lock()
    registry = CollectorRegistry()
    app[METRICS] = ApiMetrics(registry)
    health = HealthServer(settings.health_host, settings.port, service="api", registry=registry,
                          checks={"redis": lambda: _ping_redis(app), "postgres": lambda: _ping_postgres(app)})
    all_ops = ops(health.routes())
    add_routes(app, all_ops)
    app[OPENAPI] = openapi_document(all_ops)
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(_security_headers)
    app.cleanup_ctx.append(notifier_ctx)
    return app


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """nosniff on every JSON answer; no caching of anything about accounts and tokens."""
    if response.content_type == "application/json":
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path.startswith(("/api/v1/auth/", "/api/v1/me")):
        response.headers["Cache-Control"] = "no-store"


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Open the pools at startup and close them, in reverse, at shutdown."""
    settings = app[SETTINGS]
    engine = create_async_engine(sync_database_url(settings.database_url), pool_size=settings.db_pool_size,
                                 max_overflow=settings.db_pool_size, pool_pre_ping=True, pool_timeout=5)
    # After a Redis restart every pooled connection is dead; without a retry each one would fail
    # one request with 503 before being replaced. One immediate retry on a fresh connection, for
    # a refused or closed connection only (not a timeout: the command may be running), is what a
    # client told "retry shortly" would do, so every API path is already safe against it. A
    # cluster client keeps its own retry policy, which also drives its failover handling.
    retry = {} if settings.redis_cluster else {
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))}
    redis = connect_redis(settings, max_connections=settings.redis_max_connections, blocking_timeout_s=5,
                          socket_connect_timeout=2, socket_timeout=5, **retry)
    gateway = KiteGateway(root=settings.kite_root, timeout_s=settings.kite_timeout_s)
    passwords = Passwords(settings)
    app[ENGINE], app[SESSIONS], app[REDIS] = engine, async_sessionmaker(engine, expire_on_commit=False), redis
    app[READS] = async_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
    app[GATEWAY], app[PASSWORDS] = gateway, passwords
    app[THROTTLE] = LoginThrottle(redis, settings.login_max_failures, settings.login_window_s,
                                  settings.login_email_max_failures, settings.login_email_window_s)
    app[REGISTER_THROTTLE] = RegisterThrottle(redis, settings.register_max_per_addr, settings.register_window_s)
    try:
        yield
    finally:
        passwords.close()
        gateway.close()
        await redis.aclose()
        await engine.dispose()


async def _ping_redis(app: web.Application) -> None:
    await app[REDIS].ping()


async def _ping_postgres(app: web.Application) -> None:
    async with app[ENGINE].connect() as conn:
        await conn.execute(text("SELECT 1"))
