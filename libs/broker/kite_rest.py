"""Kite REST order calls on the event loop: aiohttp, keep-alive, orjson.

The order path makes two or three broker calls per order (place and order
history, after a tag lookup whenever the order may have been sent before).
Through the official client each one is a `requests` call on a pool thread,
and the threads fight the event loop for the GIL. This client
sends the same requests from the event loop over one keep-alive connection
pool shared by every account (the Authorization header is per request).

Wire format is the official client's, taken from it rather than copied:
routes from `KiteConnect._routes`, the `X-Kite-Version` header from
`KiteConnect.kite_header_version`, its User-Agent, the `token
api_key:access_token` Authorization header, the form body encoded the way
`requests` encodes it, and `requests`' default Accept headers. Replies are
read as `KiteConnect._request` reads them: Kite's error envelope raises the
`kiteconnect.exceptions` class named by `error_type` (with the HTTP status as
`code`), so `classify` treats both clients' failures alike.
(tests/integration/test_executor_kite_transport.py compares the two on the
wire.) Everything off the order path (login, profile, instruments) stays on
the official client (`libs.broker.kite.KiteGateway`).

No request is ever re-sent here: aiohttp re-sends an idempotent method once
on a dropped keep-alive connection (GET, DELETE), never a POST, so a place
that fails is a classified error and the caller's tag lookup decides.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlencode, urljoin

import aiohttp
import certifi
import orjson
from kiteconnect import KiteConnect
from kiteconnect import exceptions as kex

from libs.broker.kite import broker_environment, classify

# `requests`' default headers, so that both clients look alike to the broker.
_DEFAULT_HEADERS = {"Accept": "*/*", "Accept-Encoding": "gzip, deflate", "Connection": "keep-alive"}
_FORM = "application/x-www-form-urlencoded"


def encode_form(params: dict[str, Any]) -> bytes:
    """Encode a form body as `requests` does for `data=dict` (None values dropped by the caller)."""
    return urlencode([(k, v) for k, v in params.items()], doseq=True).encode()


def parse_reply(status: int, content_type: str, body: bytes) -> Any:
    """Return `data` of a Kite reply, or raise the exception `KiteConnect._request` would raise."""
    if "json" in content_type:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise kex.DataException(f"Couldn't parse the JSON response received from the server: {body!r}") \
                from None
        if data.get("status") == "error" or data.get("error_type"):
            exc = getattr(kex, data.get("error_type") or "", None) or kex.GeneralException
            if not (isinstance(exc, type) and issubclass(exc, kex.KiteException)):
                exc = kex.GeneralException
            raise exc(data.get("message"), code=status)
        return data["data"]
    if "csv" in content_type:
        return body
    raise kex.DataException(f"Unknown Content-Type ({content_type}) with response: ({body!r})")


class KiteOrderClient:
    """Place, cancel and read orders of any account over one shared aiohttp session."""

    def __init__(self, root: str | None = None, *, timeout_s: float = 7.0, pool_size: int = 256) -> None:
        self.root = root or KiteConnect._default_root_uri
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.pool_size = pool_size
        self._user_agent = KiteConnect._user_agent(None)  # type: ignore[arg-type]  # uses no state
        # The environment is read once, as libs.broker.kite does for the official client.
        proxies, self._ca_bundle = broker_environment(self.root)
        self._proxy = proxies.get(self.root.split(":", 1)[0]) or proxies.get("all")
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, str] = {}  # route name -> root joined with its template

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            tls = ssl.create_default_context(cafile=self._ca_bundle or certifi.where())
            connector = aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size, ssl=tls,
                                             ttl_dns_cache=300)
            # trust_env off: proxies were resolved above, and a ~/.netrc entry must never
            # replace Kite's Authorization header. No cookie jar: the session is shared by
            # every account, and a cookie one account's reply set must not ride on another's.
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, trust_env=False,
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  skip_auto_headers=("Content-Type",))
        return self._session

    def _headers(self, api_key: str, access_token: str) -> dict[str, str]:
        return {"X-Kite-Version": KiteConnect.kite_header_version, "User-Agent": self._user_agent,
                **_DEFAULT_HEADERS, "Authorization": f"token {api_key}:{access_token}"}

    async def request(self, method: str, route: str, api_key: str, access_token: str, *,
                      url_args: dict[str, str] | None = None, form: dict[str, Any] | None = None,
                      sent_order: bool = False) -> Any:
        """Send one Kite REST call; return its `data` or raise a classified BrokerError."""
        url = self._urls.get(route)
        if url is None:
            # Joined once per route: the ids and varieties filled in below are plain words and digits.
            url = self._urls[route] = urljoin(self.root, KiteConnect._routes[route])
        if url_args:
            url = url.format(**url_args)
        headers = self._headers(api_key, access_token)
        body = None
        if form is not None:
            body = encode_form(form)
            headers["Content-Type"] = _FORM
        try:
            async with self._client().request(method, url, data=body, headers=headers,
                                              proxy=self._proxy, allow_redirects=True) as resp:
                raw = await resp.read()
                return parse_reply(resp.status, resp.headers.get("Content-Type", ""), raw)
        except (kex.KiteException, aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError) as exc:
            raise classify(exc, sent_order=sent_order) from exc

    async def place_market_order(self, api_key: str, access_token: str, *, symbol: str, exchange: str,
                                 transaction_type: str, quantity: int, product: str, tag: str) -> str:
        """Place a MARKET order; return the broker order id."""
        # The fields and their order are those `KiteConnect.place_order` sends for these arguments.
        form = {"variety": KiteConnect.VARIETY_REGULAR, "exchange": exchange, "tradingsymbol": symbol,
                "transaction_type": transaction_type, "quantity": quantity, "product": product,
                "order_type": KiteConnect.ORDER_TYPE_MARKET, "tag": tag,
                "market_protection": KiteConnect.MARKET_PROTECTION_AUTO}
        data = await self.request("POST", "order.place", api_key, access_token,
                                  url_args={"variety": KiteConnect.VARIETY_REGULAR}, form=form, sent_order=True)
        return str(data["order_id"])

    async def cancel_order(self, api_key: str, access_token: str, order_id: str,
                           variety: str = KiteConnect.VARIETY_REGULAR) -> str:
        """Cancel an open order; return its order id (confirm the outcome with order_history)."""
        # A write: a timeout leaves it unknown whether the cancel reached the book.
        data = await self.request("DELETE", "order.cancel", api_key, access_token,
                                  url_args={"variety": variety, "order_id": order_id}, sent_order=True)
        return str(data["order_id"])

    async def order_history(self, api_key: str, access_token: str, order_id: str) -> list[dict[str, Any]]:
        """Return the order's history, oldest first (timestamps as the broker's strings)."""
        return await self.request("GET", "order.info", api_key, access_token, url_args={"order_id": order_id})

    async def orders(self, api_key: str, access_token: str) -> list[dict[str, Any]]:
        """Return the day's order book (timestamps as the broker's strings)."""
        return await self.request("GET", "orders", api_key, access_token)

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None
