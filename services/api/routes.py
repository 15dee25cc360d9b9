"""The route table: every operation of the API with its models (feeds aiohttp and OpenAPI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from libs.schema.models import (
    BrokerConnectOut,
    BrokerConnectRequest,
    BrokerLoginOut,
    BrokerSessionRequest,
    BrokerStatusOut,
    DeleteAccountRequest,
    KillSwitchOut,
    KillSwitchRequest,
    LoginRequest,
    OrderLogOut,
    PasswordChangeRequest,
    RegisterRequest,
    RunChangeOut,
    StartStrategyRequest,
    StatusResponse,
    StopStrategyRequest,
    StrategyCreateRequest,
    StrategyOut,
    StrategyUpdateRequest,
    TokenOut,
    UserOut,
)
from libs.schema.models.dashboard import PositionOut, StrategyListItem, StreamTicketOut, SummaryOut, TradeOut
from libs.schema.models.notify import NotificationSettingsIn, NotificationSettingsOut
from libs.schema.models.types import SYMBOL_PATTERN
from services.api import (
    auth,
    broker,
    kill_switch,
    kite_login,
    live,
    notify_routes,
    positions,
    run_control,
    status,
    strategies,
    tradebook,
)
from services.api.docs import docs_ops
from services.api.errors import json_response
from services.api.openapi import Op, build_openapi
from services.api.status import ORDERS_DEFAULT_LIMIT, ORDERS_MAX_LIMIT
from services.api.tradebook import TRADES_DEFAULT_LIMIT, TRADES_MAX_LIMIT

V1 = "/api/v1"
STATIC_DIR = Path(__file__).resolve().parent / "static"
OPENAPI = web.AppKey("openapi", dict)


# The dashboard's policy, sent as headers: frame-ancestors (clickjacking of the
# square-off button) cannot be set from the page's own <meta> tag.
DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
                 "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
STATIC_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                  "Referrer-Policy": "no-referrer", "Content-Security-Policy": DASHBOARD_CSP}


def _static(name: str, content_type: str) -> Any:
    body = (STATIC_DIR / name).read_bytes()

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=STATIC_HEADERS)

    serve.__name__ = "static_" + name.replace(".", "_")
    return serve


async def openapi_json(request: web.Request) -> web.Response:
    """Serve the OpenAPI 3.1 document."""
    return json_response(request.app[OPENAPI])


def _query(name: str, description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": {"type": "string"}}


_CALLBACK_QUERY = (
    _query("state", "The signed state Tickwise put in Kite's redirect_params (single use).", True),
    _query("request_token", "Kite's one-time request token.", True),
    _query("status", "`success` when the user logged in at Kite.", True),
    _query("action", "`login`."),
    _query("type", "`login`."),
)

_LIMIT = {"name": "limit", "in": "query", "required": False,
          "schema": {"type": "integer", "minimum": 1, "maximum": ORDERS_MAX_LIMIT, "default": ORDERS_DEFAULT_LIMIT}}


_TRADE_QUERY = (
    {"name": "from", "in": "query", "required": False, "schema": {"type": "string", "format": "date"},
     "description": "First trading day (default: 30 days before `to`)."},
    {"name": "to", "in": "query", "required": False, "schema": {"type": "string", "format": "date"},
     "description": "Last trading day (default: today, IST)."},
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": TRADES_MAX_LIMIT, "default": TRADES_DEFAULT_LIMIT}},
    {"name": "format", "in": "query", "required": False, "schema": {"type": "string", "enum": ["json", "csv"]}},
)


def api_ops() -> list[Op]:
    """Return the /api/v1 operations."""
    return [
        Op("POST", f"{V1}/auth/register", auth.register, "Register an account (a taken email gets the same answer)",
           "auth", body=RegisterRequest, status=201, response=UserOut, auth=False, errors=(415, 429, 503)),
        Op("POST", f"{V1}/auth/login", auth.login, "Log in for a bearer token", "auth", body=LoginRequest,
           response=TokenOut, auth=False, errors=(401, 415, 429)),
        Op("POST", f"{V1}/auth/logout", auth.logout, "Revoke the caller's token", "auth", status=204),
        Op("GET", f"{V1}/me", auth.me, "The caller", "auth", response=UserOut),
        Op("POST", f"{V1}/me/password", auth.change_password, "Change the password (revokes every session)",
           "auth", body=PasswordChangeRequest, status=204, errors=(403, 415, 429, 503)),
        Op("DELETE", f"{V1}/me", auth.delete_account, "Delete the account (stops every run; square-off optional)",
           "auth", body=DeleteAccountRequest, status=204, errors=(403, 409, 415, 429, 503)),
        Op("POST", f"{V1}/broker/connect", broker.connect, "Store and verify Kite credentials", "broker",
           body=BrokerConnectRequest, response=BrokerConnectOut, errors=(409, 503)),
        Op("POST", f"{V1}/broker/session", broker.new_session, "Exchange a Kite request_token (daily login)",
           "broker", body=BrokerSessionRequest, response=BrokerConnectOut, errors=(409, 503)),
        Op("GET", f"{V1}/broker", broker.status, "Broker connection and token state (no secrets)", "broker",
           response=BrokerStatusOut),
        Op("GET", f"{V1}/broker/login", kite_login.login, "Kite login URL with a signed single-use state",
           "broker", response=BrokerLoginOut, errors=(409,)),
        Op("GET", f"{V1}/broker/callback", kite_login.callback,
           "Kite login redirect: check the state, exchange the request_token, store the token", "broker",
           response=BrokerConnectOut, auth=False, errors=(400, 403, 409, 422, 503), query=_CALLBACK_QUERY,
           redirect="Browsers (no `Accept: application/json`) go back to the dashboard with "
                    "`?broker_login=success` or `?broker_login=error&code=...&message=...`."),
        Op("POST", f"{V1}/kill-switch", kill_switch.press,
           "Stop every running strategy (square_off: sell every held position once)", "runs",
           body=KillSwitchRequest, response=KillSwitchOut, errors=(503,)),
        Op("POST", f"{V1}/strategies", strategies.create, "Create a strategy", "strategies",
           body=StrategyCreateRequest, status=201, response=StrategyOut, errors=(409, 503)),
        Op("GET", f"{V1}/strategies", status.list_strategies, "List the caller's strategies with status and P&L",
           "strategies", response=StrategyListItem, many=True),
        Op("GET", f"{V1}/strategies/{{id}}", strategies.get_one, "One strategy", "strategies",
           response=StrategyOut),
        Op("PATCH", f"{V1}/strategies/{{id}}", strategies.patch, "Change a strategy that is not running",
           "strategies", body=StrategyUpdateRequest, response=StrategyOut, errors=(409, 503)),
        Op("DELETE", f"{V1}/strategies/{{id}}", strategies.delete, "Delete a strategy that is not running",
           "strategies", status=204, errors=(409,)),
        Op("POST", f"{V1}/strategies/start", run_control.start, "Start a strategy run", "runs",
           body=StartStrategyRequest, response=RunChangeOut, errors=(404, 409, 503)),
        Op("POST", f"{V1}/strategies/stop", run_control.stop, "Stop a strategy run (optionally square off)",
           "runs", body=StopStrategyRequest, response=RunChangeOut, errors=(404, 409, 503)),
        Op("GET", f"{V1}/strategies/{{id}}/status", status.status, "Live status (data model §4.7)", "runs",
           response=StatusResponse),
        Op("GET", f"{V1}/strategies/{{id}}/orders", status.orders, "Order log, newest first", "runs",
           response=OrderLogOut, many=True, errors=(422,), query=(_LIMIT,)),
        Op("GET", f"{V1}/positions", positions.positions, "Day positions from the broker, with their strategies",
           "money", response=PositionOut, many=True, errors=(409, 503)),
        Op("GET", f"{V1}/quote", positions.quote, "Last price of a symbol (live tick, else the broker's LTP)",
           "money", raw_schema={"type": "object", "properties": {"symbol": {"type": "string"},
                                                                 "last_price": {"type": "number"},
                                                                 "source": {"enum": ["ticks", "broker"]}}},
           errors=(409, 422, 503), query=({"name": "symbol", "in": "query", "required": True,
                                           "schema": {"type": "string", "pattern": SYMBOL_PATTERN}},)),
        Op("GET", f"{V1}/summary", tradebook.summary, "Today's totals: strategies, orders, P&L", "money",
           response=SummaryOut),
        Op("GET", f"{V1}/orders", tradebook.trade_book, "Trade book: confirmed fills, newest first (JSON or CSV)",
           "money", response=TradeOut, many=True, errors=(422,), query=_TRADE_QUERY),
        Op("GET", f"{V1}/notifications", notify_routes.get_settings, "Where the caller's notifications go",
           "notifications", response=NotificationSettingsOut),
        Op("PUT", f"{V1}/notifications", notify_routes.put_settings,
           "Set webhook URL / Telegram chat (a new webhook secret is shown once)", "notifications",
           body=NotificationSettingsIn, response=NotificationSettingsOut),
        Op("POST", f"{V1}/notifications/secret", notify_routes.rotate_secret,
           "Rotate the webhook signing secret (shown once)", "notifications", response=NotificationSettingsOut,
           errors=(409,)),
        Op("POST", f"{V1}/notifications/test", notify_routes.send_test, "Queue a test notification",
           "notifications", status=202, raw_schema={"type": "object", "properties": {"queued": {"type": "string"}}}),
        Op("POST", f"{V1}/stream/ticket", live.ticket, "A 60-second ticket that opens the caller's event stream",
           "live", response=StreamTicketOut),
        Op("GET", f"{V1}/stream", live.stream, "Server-Sent Events: strategies, order-log rows, broker state",
           "live", auth=False, media_type="text/event-stream", raw_schema={"type": "string"},
           query=({"name": "ticket", "in": "query", "required": True, "schema": {"type": "string"},
                   "description": "From POST /api/v1/stream/ticket (EventSource cannot send headers)."},),
           errors=(401,)),
    ]


def ops(health_routes: list[web.RouteDef]) -> list[Op]:
    """Return every operation: the API, the health/metrics routes, the docs and the dashboard."""
    health = {route.path: route.handler for route in health_routes}
    probe = {"type": "object", "properties": {"status": {"type": "string"}}}
    return [
        *api_ops(),
        Op("GET", "/openapi.json", openapi_json, "This document", "meta", auth=False),
        *docs_ops(),
        Op("GET", "/healthz", health["/healthz"], "Process is up", "meta", auth=False, raw_schema=probe),
        Op("GET", "/readyz", health["/readyz"], "Redis and Postgres answer", "meta", auth=False,
           errors=(503,), raw_schema=probe),
        Op("GET", "/metrics", health["/metrics"], "Prometheus metrics", "meta", auth=False,
           media_type="text/plain", raw_schema={"type": "string"}),
        Op("GET", "/", _static("index.html", "text/html"), "Dashboard", "meta", auth=False,
           media_type="text/html", raw_schema={"type": "string"}),
        Op("GET", "/static/app.js", _static("app.js", "application/javascript"), "Dashboard script", "meta",
           auth=False, media_type="application/javascript", raw_schema={"type": "string"}),
    ]


def openapi_document(all_ops: list[Op]) -> dict:
    return build_openapi(all_ops)
