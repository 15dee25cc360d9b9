"""Kite REST order calls on the event loop: HTTP/1.1 keep-alive, orjson.

The order path makes three broker calls per order (tag lookup, place, order
history). Through the official client each one is a `requests` call on a
pool thread, and the threads fight the event loop for the GIL. This client
sends the same requests from the event loop over one keep-alive connection
pool shared by every account (the Authorization header is per request):
its own small HTTP/1.1 transport (below, with httptools parsing replies),
or aiohttp when an HTTP(S) proxy is configured for the broker.

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

Redirects are not followed (Kite's order routes never redirect; a 3xx is a
reply that does not parse, so a classified error). No POST is ever re-sent
here: like aiohttp, an idempotent method (GET,
DELETE) that finds its idle keep-alive connection dead before any reply byte
goes once more on a new one, never a POST, so a place that fails is a
classified error and the caller's tag lookup decides.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import aiohttp
import certifi
import httptools
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
        self._pool: _ConnectionPool | None = None
        origin = urlsplit(self.root)
        self._https = origin.scheme == "https"
        self._host = origin.hostname or ""
        self._port = origin.port or (443 if self._https else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host  # an IPv6 literal keeps its brackets
        self._host_header = host if origin.port is None else f"{host}:{origin.port}"

    def _direct(self) -> _ConnectionPool:
        if self._pool is None:
            tls = ssl.create_default_context(cafile=self._ca_bundle or certifi.where()) if self._https else None
            self._pool = _ConnectionPool(self._host, self._port, tls, self.pool_size)
        return self._pool

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
        uri = KiteConnect._routes[route].format(**url_args) if url_args else KiteConnect._routes[route]
        headers = self._headers(api_key, access_token)
        body = None
        if form is not None:
            body = encode_form(form)
            headers["Content-Type"] = _FORM
        try:
            if self._proxy is None:
                status, content_type, raw = await self._send_direct(method, uri, headers, body)
                return parse_reply(status, content_type, raw)
            async with self._client().request(method, urljoin(self.root, uri), data=body, headers=headers,
                                              proxy=self._proxy, allow_redirects=True) as resp:
                raw = await resp.read()
                return parse_reply(resp.status, resp.headers.get("Content-Type", ""), raw)
        except (kex.KiteException, aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError) as exc:
            raise classify(exc, sent_order=sent_order) from exc

    async def _send_direct(self, method: str, uri: str, headers: dict[str, str],
                           body: bytes | None) -> tuple[int, str, bytes]:
        """Send one request over the keep-alive pool; return (status, content type, body)."""
        if any("\r" in value or "\n" in value for value in headers.values()):
            raise ValueError("refusing a header value with a line break")  # no header injection via a token
        lines = [f"{method} {quote(uri, safe=_SAFE_PATH)} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        elif method not in ("GET", "HEAD"):
            lines.append("Content-Length: 0")  # as `requests` sends for a body-less DELETE
        payload = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b"")
        async with asyncio.timeout(self.timeout.total):
            status, reply_headers, raw = await self._direct().send(
                payload, resend_on_stale=method in ("GET", "HEAD", "DELETE"))
        return status, reply_headers.get(b"content-type", b"").decode("latin-1"), raw

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
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- The order path's HTTP/1.1 transport -----------------------------------------------------
# aiohttp costs ~0.15 ms of CPU per call (request/response objects, header multidicts,
# timers, tasks); the executor makes three calls per order, so the order path speaks
# HTTP/1.1 itself: one protocol object per keep-alive connection, httptools (llhttp, as
# aiohttp and uvicorn use) to parse replies, and the request written in one buffer.

IDLE_KEEPALIVE_S = 15.0  # aiohttp's default: a connection idle longer is closed rather than reused
_SAFE_PATH = "!#$%&'()*+,/:;=?@[]~"  # what `requests.utils.requote_uri` leaves as is


class _Connection(asyncio.Protocol):
    """One keep-alive connection: write a request, wait for its whole reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[tuple[int, dict[bytes, bytes], bytes, bool]] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self.received = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes no request asked for (a server's parting 408, a late reply): the stream is
            # out of step, so the connection is never used again.
            self._fail(aiohttp.ServerDisconnectedError("unsolicited bytes on an idle connection"))
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(aiohttp.ClientPayloadError(f"malformed reply from the broker: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or aiohttp.ServerDisconnectedError("broker closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._waiter is None or self._waiter.done():
            # A second reply to one request (a parting 408): the stream is out of step.
            self._fail(aiohttp.ServerDisconnectedError("unsolicited reply on the connection"))
            return
        # Taken now: the parser is reset for whatever follows once this callback returns.
        self._waiter.set_result((self.parser.get_status_code(), dict(self._headers), b"".join(self._body),
                                 self.parser.should_keep_alive()))
        self._headers, self._body = [], []

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def exchange(self, payload: bytes) -> tuple[int, dict[bytes, bytes], bytes, bool]:
        """Send one request; return (status, headers, body, keep-alive)."""
        assert self.transport is not None
        self._headers, self._body, self.received = [], [], False
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        status, headers, body, keep_alive = await self._waiter
        encoding = headers.get(b"content-encoding", b"").strip().lower()
        try:
            if encoding == b"gzip":
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
            elif encoding == b"deflate":
                # zlib-wrapped, or raw deflate as some servers send it
                body = zlib.decompress(body, 15 if body[:1] == b"\x78" else -zlib.MAX_WBITS)
        except zlib.error as error:
            raise aiohttp.ClientPayloadError(f"reply body does not decode as {encoding.decode()}: {error}") from None
        return status, headers, body, keep_alive and not self.closed


class _ConnectionPool:
    """Keep-alive connections to one origin, at most `limit` at once."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, limit: int) -> None:
        self.host, self.port, self.tls = host, port, tls
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)

    async def _connection(self) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and loop.time() - conn.idle_since < IDLE_KEEPALIVE_S:
                return conn, True
            conn.abort()
        _transport, conn = await loop.create_connection(
            _Connection, self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None)
        return conn, False

    async def send(self, payload: bytes, *, resend_on_stale: bool) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send on an idle connection (or a new one); a GET/DELETE that met a dead idle one goes once more.

        A POST is never sent twice: its failure is the caller's to classify (the tag lookup decides).
        """
        async with self._slots:
            while True:
                conn, reused = await self._connection()
                try:
                    status, headers, body, keep = await conn.exchange(payload)
                except (OSError, aiohttp.ServerDisconnectedError):
                    conn.abort()
                    if reused and resend_on_stale and not conn.received:
                        resend_on_stale = False
                        continue
                    raise
                except BaseException:
                    conn.abort()  # cancelled or timed out mid-reply: its state is unknown
                    raise
                if keep and not conn.closed:
                    conn.idle_since = asyncio.get_running_loop().time()
                    self._idle.append(conn)
                else:
                    conn.abort()
                return status, headers, body

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
