"""Simulator admin API under `/sim/`: accounts, prices, faults, inspection, reset.

No Kite auth here; instead only loopback peers are served, since these
routes mint credentials and move prices.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from yarl import URL

from services.kite_sim.book import Book
from services.kite_sim.faults import FaultConfigError, Faults
from services.kite_sim.market import Instrument, Market
from services.kite_sim.ticks import TickHub

log = structlog.get_logger("kite_sim")

AdminHandler = Callable[["AdminApi", web.Request], Awaitable[Any]]


class AdminError(Exception):
    """A bad admin request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(data: Any, status: int = 200) -> web.Response:
    """Render plain JSON (admin routes do not use Kite's envelope)."""
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def is_loopback(peer: str | None) -> bool:
    """Tell whether the peer address is a loopback address."""
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def admin_endpoint(fn: AdminHandler) -> Callable[[AdminApi, web.Request], Awaitable[web.StreamResponse]]:
    """Refuse non-loopback peers and map AdminError to a JSON error."""

    async def endpoint(self: AdminApi, request: web.Request) -> web.StreamResponse:
        if not is_loopback(request.remote):
            return json_response({"error": "admin API is loopback-only"}, status=403)
        try:
            data = await fn(self, request)
        except AdminError as exc:
            return json_response({"error": exc.message}, status=exc.status)
        return data if isinstance(data, web.StreamResponse) else json_response(data)

    endpoint.__doc__ = fn.__doc__
    return endpoint


async def read_json(request: web.Request) -> Any:
    """Parse an optional JSON body."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise AdminError(400, f"invalid JSON: {exc}") from exc


def _http_url(body: dict[str, Any], name: str) -> str | None:
    """Return body[name] as a normalised http(s) URL, None if absent; 400 otherwise."""
    raw = body.get(name) or None
    if raw is None:
        return None
    url = URL(str(raw))
    if url.scheme not in ("http", "https") or not url.host:
        raise AdminError(400, f"{name} must be an http(s) URL")
    return str(url)


class AdminApi:
    """Serve `/sim/*` over the simulator's state."""

    def __init__(self, market: Market, book: Book, faults: Faults, hub: TickHub) -> None:
        self.market = market
        self.book = book
        self.faults = faults
        self.hub = hub

    def routes(self) -> list[web.RouteDef]:
        """Return the admin routes."""
        return [
            web.post("/sim/accounts", self.create_account),
            web.post("/sim/accounts/{api_key}/expire", self.expire),
            web.post("/sim/accounts/{api_key}/request_token", self.request_token),
            web.post("/sim/ticks", self.ticks),
            web.get("/sim/orders", self.orders),
            web.post("/sim/liquidity", self.set_liquidity),
            web.get("/sim/liquidity", self.get_liquidity),
            web.post("/sim/faults", self.set_faults),
            web.get("/sim/faults", self.get_faults),
            web.post("/sim/ws/drop", self.drop_ws),
            web.post("/sim/reset", self.reset),
        ]

    @admin_endpoint
    async def create_account(self, request: web.Request) -> Any:
        """Open an account: optional JSON {"user_name", "daily_order_cap", "postback_url", "redirect_url"}."""
        body = await read_json(request) or {}
        if not isinstance(body, dict):
            raise AdminError(400, "expected a JSON object")
        cap = body.get("daily_order_cap")
        postback_url, redirect_url = _http_url(body, "postback_url"), _http_url(body, "redirect_url")
        account = self.book.create_account(body.get("user_name"), int(cap) if cap else None, postback_url)
        account.redirect_url = redirect_url
        log.info("account created", user_id=account.user_id, postback=postback_url is not None)
        return {"api_key": account.api_key, "api_secret": account.api_secret,
                "access_token": account.access_token, "user_id": account.user_id,
                "user_name": account.user_name, "postback_url": account.postback_url,
                "redirect_url": account.redirect_url}

    def _account(self, request: web.Request) -> Any:
        account = self.book.accounts.get(request.match_info["api_key"])
        if account is None:
            raise AdminError(404, "unknown api_key")
        return account

    @admin_endpoint
    async def expire(self, request: web.Request) -> Any:
        """Expire the account's access token and close its ticker sockets."""
        account = self._account(request)
        account.expired = True
        closed = await self.hub.close_all(api_key=account.api_key)
        log.info("token expired", user_id=account.user_id, ws_closed=closed)
        return {"expired": True, "ws_closed": closed}

    @admin_endpoint
    async def request_token(self, request: web.Request) -> Any:
        """Issue a request_token, as the login redirect would."""
        return {"request_token": self.book.issue_request_token(self._account(request))}

    @admin_endpoint
    async def ticks(self, request: web.Request) -> Any:
        """Set prices from {"symbol","last_price"} or a list of them and push ticks now."""
        body = await read_json(request)
        items = body if isinstance(body, list) else [body]
        updates: list[tuple[Instrument, int]] = []
        for item in items:
            if not isinstance(item, dict) or "symbol" not in item or "last_price" not in item:
                raise AdminError(400, "each tick needs symbol and last_price")
            ins = self.market.resolve(str(item["symbol"]))
            if ins is None:
                raise AdminError(400, f"unknown symbol {item['symbol']!r}")
            try:
                paise = round(float(item["last_price"]) * 100)
            except (TypeError, ValueError):
                raise AdminError(400, "last_price must be a number") from None
            if paise <= 0:
                raise AdminError(400, "last_price must be positive")
            updates.append((ins, paise))
        qty = int(items[0].get("quantity", 1)) if items else 1
        self.market.set_prices(updates, qty=max(1, qty))
        return {"updated": len(updates)}

    @admin_endpoint
    async def orders(self, request: web.Request) -> Any:
        """List every order received, optionally filtered by api_key and tag."""
        api_key, tag = request.query.get("api_key"), request.query.get("tag")
        if api_key is not None:
            account = self.book.accounts.get(api_key)
            source = account.orders.values() if account else ()
        else:
            source = self.book.orders.values()
        return [o.as_admin() for o in source if tag is None or o.tag == tag]

    @admin_endpoint
    async def set_liquidity(self, request: web.Request) -> Any:
        """Change how fills happen: {"slippage_bps", "depth_quantity", "cancel_unfilled_market"} (any; /sim/reset
        restores all). `cancel_unfilled_market`: the exchange cancels what a MARKET order cannot fill at once.
        """
        body = await read_json(request) or {}
        if not isinstance(body, dict) or set(body) - {"slippage_bps", "depth_quantity", "cancel_unfilled_market"}:
            raise AdminError(400, "expected a JSON object with slippage_bps, depth_quantity and/or "
                                  "cancel_unfilled_market")
        cancel_rest = body.get("cancel_unfilled_market", self.book.cancel_unfilled_market)
        if not isinstance(cancel_rest, bool):
            raise AdminError(400, "cancel_unfilled_market must be true or false")
        try:
            slippage = float(body.get("slippage_bps", self.book.slippage * 10_000))
            depth = int(body.get("depth_quantity", self.book.liquidity.depth_quantity))
        except (TypeError, ValueError):
            raise AdminError(400, "slippage_bps and depth_quantity must be numbers") from None
        if not 0 <= slippage <= 1000 or depth < 1:
            raise AdminError(400, "slippage_bps must be within 0..1000 and depth_quantity at least 1")
        self.book.slippage, self.book.liquidity.depth_quantity = slippage / 10_000, depth
        self.book.cancel_unfilled_market = cancel_rest
        log.info("liquidity set", slippage_bps=slippage, depth_quantity=depth, cancel_unfilled_market=cancel_rest)
        return self._liquidity()

    @admin_endpoint
    async def get_liquidity(self, request: web.Request) -> Any:
        """Return the fill settings."""
        return self._liquidity()

    def _liquidity(self) -> dict[str, Any]:
        return {"slippage_bps": round(self.book.slippage * 10_000, 6),
                "depth_quantity": self.book.liquidity.depth_quantity,
                "cancel_unfilled_market": self.book.cancel_unfilled_market}

    @admin_endpoint
    async def set_faults(self, request: web.Request) -> Any:
        """Replace the fault settings."""
        body = await read_json(request) or {}
        if not isinstance(body, dict):
            raise AdminError(400, "expected a JSON object")
        try:
            self.faults.update(body)
        except FaultConfigError as exc:
            raise AdminError(400, str(exc)) from exc
        log.info("faults set", **self.faults.as_dict())
        return self.faults.as_dict()

    @admin_endpoint
    async def get_faults(self, request: web.Request) -> Any:
        """Return the fault settings."""
        return self.faults.as_dict()

    @admin_endpoint
    async def drop_ws(self, request: web.Request) -> Any:
        """Drop every ticker socket; {"abort": true} cuts TCP without a close frame."""
        body = await read_json(request) or {}
        abort = bool(body.get("abort")) if isinstance(body, dict) else False
        return {"dropped": await self.hub.close_all(abort=abort)}

    @admin_endpoint
    async def reset(self, request: web.Request) -> Any:
        """Clear accounts, orders and faults; put prices back to base."""
        self.faults.reset()
        await self.hub.close_all()
        self.book.reset()
        self.market.reset()
        log.info("simulator reset")
        return {"reset": True}
