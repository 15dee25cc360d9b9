"""Kite Connect v3 REST routes: envelope, token auth, orders, portfolio, quotes.

Error responses carry Kite's `error_type`, which the official client turns
into its exception class (TokenException, InputException, ...), with the
HTTP status the real API uses. Fault groups (see faults.py): `user`,
`session`, `instruments`, `orders`, `portfolio`, `quote`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from services.kite_sim.book import Account, Book, LimitExceeded, Order, kite_time
from services.kite_sim.faults import Faults
from services.kite_sim.market import Market
from services.kite_sim.order_rules import ORDER_TYPES, PRODUCTS, OrderRules, RuleViolation

Handler = Callable[["KiteRest", web.Request, Account | None], Awaitable[Any]]


class KiteError(Exception):
    """An error answered in Kite's error envelope."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    def response(self) -> web.Response:
        """Render as Kite's error envelope."""
        body = {"status": "error", "error_type": self.error_type, "message": self.message, "data": None}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json")


def input_error(message: str) -> KiteError:
    """Build a 400 InputException."""
    return KiteError(400, "InputException", message)


def token_error(message: str = "Incorrect `api_key` or `access_token`.") -> KiteError:
    """Build a 403 TokenException."""
    return KiteError(403, "TokenException", message)


def success(data: Any) -> web.Response:
    """Render data in Kite's success envelope."""
    return web.Response(body=orjson.dumps({"status": "success", "data": data}), content_type="application/json")


def success_json(data_json: bytes) -> web.Response:
    """Render already encoded data in Kite's success envelope (byte for byte what `success` gives)."""
    return web.Response(body=b'{"status":"success","data":' + data_json + b"}", content_type="application/json")


RENDERED_ORDERS = 20_000
"""Orders whose encoded JSON is kept (a few KB each, the history's entries)."""


def kept(encoded: bytes) -> bytes:
    """Return orjson's output copied to a bytes object of its own size, to be kept.

    orjson's bytes keep the 4-8 KB buffer they were written into: six kept per
    order grew the simulator by ~45 KB an order (~10 page faults each, about a
    tenth of its CPU under the order benchmarks). A copy of an order is 0.7 KB.
    """
    return bytes(memoryview(encoded))


class RenderedOrders:
    """Each order's Kite JSON, encoded once per state of the order.

    The tag lookup (GET /orders) and the history read (GET /orders/{id}) come
    with every order an executor places and render the same unchanged orders
    again and again. An entry is kept with its order (so a reset's reused order
    ids never match an old one) and the state it was rendered at: the snapshot,
    or the history's length, with what a modification changes besides. A
    history is kept as the whole success body of its GET, and grows by the new
    entries only; the order as it stands is usually its last history entry, so
    a history read also fills the order's own entry. At most RENDERED_ORDERS
    orders are kept in each (the least recently rendered go first).
    """

    def __init__(self, book: Book) -> None:
        self.book = book
        self.current: dict[str, tuple[Order, tuple[Any, ...], bytes]] = {}
        self.histories: dict[str, tuple[Order, tuple[Any, ...], bytes]] = {}

    def _trim(self, cache: dict[str, Any], order_id: str) -> None:
        cache.pop(order_id, None)  # re-inserted last: the dict's order is the rendering order
        if len(cache) > 2 * len(self.book.orders) + 1024:  # orders dropped by a reset
            cache.clear()
        while len(cache) >= RENDERED_ORDERS:
            del cache[next(iter(cache))]

    @staticmethod
    def _state(order: Order, snapshot: tuple[Any, ...]) -> tuple[Any, ...]:
        return snapshot, order.modifications, order.market_protection

    def order(self, order: Order) -> bytes:
        """Return `order.as_kite()` encoded."""
        state = self._state(order, order.snapshot())
        hit = self.current.get(order.order_id)
        if hit is not None and hit[0] is order and hit[1] == state:
            return hit[2]
        self._trim(self.current, order.order_id)
        encoded = kept(orjson.dumps(order.as_kite()))
        self.current[order.order_id] = (order, state, encoded)
        return encoded

    def history_body(self, order: Order) -> bytes:
        """Return the success body of the order's history: `success([order.as_kite(e) for e in order.history])`."""
        history = order.history
        state = (len(history), order.modifications, order.market_protection)
        hit = self.histories.get(order.order_id)
        if hit is not None and hit[0] is order and hit[1] == state:
            return hit[2]
        self._trim(self.histories, order.order_id)
        if hit is not None and hit[0] is order and hit[1][1:] == state[1:] and hit[1][0]:
            done, head = hit[1][0], hit[2][:-2] + b","  # entries never change: encode only the new ones
        else:
            done, head = 0, b'{"status":"success","data":['
        dumps = orjson.dumps
        entries = [dumps(entry) for entry in order.history_as_kite(done)]
        body = head + b",".join(entries) + b"]}"
        self.histories[order.order_id] = (order, state, body)
        snapshot = order.snapshot()
        if entries and history[-1] == snapshot:
            self._trim(self.current, order.order_id)
            self.current[order.order_id] = (order, self._state(order, snapshot), kept(entries[-1]))
        return body


def kite_endpoint(group: str, auth: bool = True) -> Callable[[Handler], Callable[[KiteRest, web.Request], Any]]:
    """Wrap a handler with fault injection, token auth and the envelope."""

    def decorate(fn: Handler) -> Callable[[KiteRest, web.Request], Any]:
        async def endpoint(self: KiteRest, request: web.Request) -> web.StreamResponse:
            try:
                if self.faults.before_request:  # one attribute read when no fault is set (the common case)
                    await self.inject_faults(group)
                account = self.authenticate(request) if auth else None
                data = await fn(self, request, account)
            except KiteError as exc:
                return exc.response()
            return data if isinstance(data, web.StreamResponse) else success(data)

        endpoint.__doc__ = fn.__doc__
        return endpoint

    return decorate


def profile_of(account: Account) -> dict[str, Any]:
    """Return Kite's profile payload for an account."""
    return {
        "user_id": account.user_id,
        "user_type": "individual",
        "email": f"{account.user_id.lower()}@paper.tickwise",
        "user_name": account.user_name,
        "user_shortname": account.user_name.split()[0],
        "broker": "ZERODHA",
        "exchanges": ["NSE"],
        "products": sorted(PRODUCTS),
        "order_types": sorted(ORDER_TYPES),
        "avatar_url": None,
        "meta": {"demat_consent": "physical"},
    }


class KiteRest:
    """Serve the Kite REST surface over a market, a book and a fault plan."""

    def __init__(self, market: Market, book: Book, faults: Faults, rules: OrderRules | None = None) -> None:
        self.market = market
        self.book = book
        self.faults = faults
        self.rules = rules or OrderRules(market, book)
        self.rendered = RenderedOrders(book)

    def routes(self) -> list[web.RouteDef]:
        """Return the Kite routes."""
        return [
            web.get("/user/profile", self.profile),
            web.post("/session/token", self.session_token),
            web.delete("/session/token", self.invalidate_token),
            web.get("/instruments", self.instruments),
            web.get("/instruments/{exchange}", self.instruments),
            web.get("/orders", self.orders),
            web.post("/orders/{variety}", self.place_order),
            web.get("/orders/{order_id}", self.order_history),
            web.get("/orders/{order_id}/trades", self.order_trades),
            web.put("/orders/{variety}/{order_id}", self.modify_order),
            web.delete("/orders/{variety}/{order_id}", self.cancel_order),
            web.get("/trades", self.trades),
        ]

    async def inject_faults(self, group: str) -> None:
        """Apply latency, 429 bursts and 5xx before the request is served."""
        faults = self.faults
        cfg = faults.config
        if cfg.latency_ms > 0 and faults.applies(group):
            await asyncio.sleep(cfg.latency_ms / 1000)
        if faults.take_429(group):
            raise KiteError(429, "NetworkException", "Too many requests (injected burst)")
        if faults.take_500(group) or faults.roll(cfg.error_rate, group):
            raise KiteError(500, "GeneralException", "Internal server error (injected)")

    def authenticate(self, request: web.Request) -> Account:
        """Resolve `Authorization: token api_key:access_token` to a live account."""
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        api_key, _, access_token = credentials.partition(":")
        if scheme.lower() != "token" or not api_key or not access_token:
            raise token_error()
        account = self.book.authenticate(api_key, access_token)
        if account is None:
            raise token_error()
        return account

    @kite_endpoint("user")
    async def profile(self, request: web.Request, account: Account | None) -> Any:
        """Return the user's profile."""
        assert account is not None
        return profile_of(account)

    @kite_endpoint("session", auth=False)
    async def session_token(self, request: web.Request, account: Account | None) -> Any:
        """Exchange a request_token for an access_token (checksum = sha256(key+token+secret))."""
        form = await request.post()
        api_key, request_token = str(form.get("api_key", "")), str(form.get("request_token", ""))
        checksum = str(form.get("checksum", ""))
        account = self.book.accounts.get(api_key)
        if account is None or request_token not in account.request_tokens:
            raise token_error("Token is invalid or has expired.")
        expected = hashlib.sha256((api_key + request_token + account.api_secret).encode()).hexdigest()
        if not hmac.compare_digest(expected, checksum):
            raise token_error("Invalid `checksum`.")
        account.request_tokens.discard(request_token)
        self.book.start_session(account)
        return profile_of(account) | {
            "api_key": account.api_key,
            "access_token": account.access_token,
            "public_token": account.access_token[:16],
            "refresh_token": "",
            "enctoken": "",
            "login_time": kite_time(account.login_time),
        }

    @kite_endpoint("session")
    async def invalidate_token(self, request: web.Request, account: Account | None) -> Any:
        """Log the session out."""
        assert account is not None
        account.expired = True
        return True

    @kite_endpoint("instruments")
    async def instruments(self, request: web.Request, account: Account | None) -> Any:
        """Serve the instruments dump as CSV."""
        exchange = request.match_info.get("exchange", "NSE").upper()
        body = self.market.instruments_csv if exchange == "NSE" else self.market.empty_csv
        return web.Response(body=body, content_type="text/csv")

    @kite_endpoint("orders")
    async def orders(self, request: web.Request, account: Account | None) -> Any:
        """List the account's orders of the day."""
        assert account is not None
        render = self.rendered.order
        return success_json(b"[" + b",".join([render(o) for o in account.orders.values()]) + b"]")

    @kite_endpoint("orders")
    async def place_order(self, request: web.Request, account: Account | None) -> Any:
        """Place an order; answer with its order_id."""
        assert account is not None
        try:
            self.book.count_order_request(account, time.monotonic())
        except LimitExceeded as exc:
            if exc.per_second:
                raise KiteError(429, "NetworkException", str(exc)) from exc
            raise input_error(str(exc)) from exc
        form = await request.post()
        try:
            fields = self.rules.placement(request.match_info["variety"], form)
        except RuleViolation as exc:
            raise KiteError(400, exc.error_type, exc.message) from exc
        order = self.book.new_order(account, **fields)
        faults = self.faults
        if faults.roll(faults.config.reject_rate, "orders"):
            self.book.reject(order, "RMS:Rule: simulated rejection (fault injection)")
        else:
            self.book.execute(order)
        if faults.roll(faults.config.timeout_after_accept_rate, "orders"):
            # The order is in the book; the client just never hears back.
            await faults.hold()
        return {"order_id": order.order_id}

    def _own_order(self, account: Account, order_id: str) -> Order:
        order = account.orders.get(order_id)
        if order is None:
            raise input_error("Couldn't find that `order_id`.")
        return order

    @kite_endpoint("orders")
    async def order_history(self, request: web.Request, account: Account | None) -> Any:
        """Return every state the order went through, oldest first."""
        assert account is not None
        order = self._own_order(account, request.match_info["order_id"])
        return web.Response(body=self.rendered.history_body(order), content_type="application/json")

    @kite_endpoint("orders")
    async def order_trades(self, request: web.Request, account: Account | None) -> Any:
        """Return the order's fills."""
        assert account is not None
        return self._own_order(account, request.match_info["order_id"]).trades_as_kite()

    @kite_endpoint("orders")
    async def trades(self, request: web.Request, account: Account | None) -> Any:
        """Return every fill of the day."""
        assert account is not None
        return [t for o in account.orders.values() for t in o.trades_as_kite()]

    @kite_endpoint("orders")
    async def modify_order(self, request: web.Request, account: Account | None) -> Any:
        """Modify quantity, price, trigger price or order type of an open or trigger-pending order."""
        assert account is not None
        order = self._own_order(account, request.match_info["order_id"])
        form = await request.post()
        try:
            change = self.rules.modification(order, form)
        except RuleViolation as exc:
            raise KiteError(400, exc.error_type, exc.message) from exc
        self.book.modify(order, change)
        return {"order_id": order.order_id}

    @kite_endpoint("orders")
    async def cancel_order(self, request: web.Request, account: Account | None) -> Any:
        """Cancel what is left of an open or trigger-pending order."""
        assert account is not None
        order = self._own_order(account, request.match_info["order_id"])
        if not self.book.cancel(order):
            raise input_error(f"Order cannot be cancelled as it is {order.status}.")
        return {"order_id": order.order_id}
