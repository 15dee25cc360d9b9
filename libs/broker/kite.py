"""Kite Connect off the order path: the official client in a bounded thread pool.

The `kiteconnect` REST client is blocking (`requests`), so every call runs in a
thread pool owned by the gateway, never on the event loop. It serves what is
not latency-bound (login, profile, instruments, quotes); the order path
(place, cancel, order book, order history) runs on the event loop in
`libs.broker.kite_rest`, with the same wire format. Broker errors of both are
classified once, here:

- RETRYABLE: nothing happened at the broker (429, 502-504, refused connection
  before sending, GET timeouts). Safe to try again later.
- AMBIGUOUS: an order request may or may not have reached the book (timeout or
  reset after sending, 5xx on POST, unreadable reply). Reconcile by tag first.
- FINAL: the broker said no (input/order errors, rejection). Retrying is futile.
- AUTH: the access token is invalid or expired (403 TokenException).

The process environment (proxy variables, CA bundle variables, ~/.netrc) is
read once per gateway, not per request: sessions run with `trust_env=False`
and get the proxies and CA bundle resolved at construction. (A ~/.netrc entry
for the broker host would have replaced Kite's `Authorization` header, so
ignoring it is also more correct.)
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiohttp
import requests
from kiteconnect import KiteConnect
from kiteconnect import exceptions as kex

T = TypeVar("T")


class BrokerErrorKind(enum.StrEnum):
    RETRYABLE = "retryable"
    AMBIGUOUS = "ambiguous"
    FINAL = "final"
    AUTH = "auth"


class BrokerError(Exception):
    """A classified broker failure; `message` never contains credentials."""

    def __init__(self, kind: BrokerErrorKind, message: str, *, code: int | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.error_type = error_type

    def as_payload(self) -> dict[str, Any]:
        return {"error_kind": self.kind.value, "error_type": self.error_type, "code": self.code,
                "message": self.message}


def classify(exc: BaseException, *, sent_order: bool) -> BrokerError:
    """Map a kiteconnect/requests/aiohttp exception to a BrokerError."""
    if isinstance(exc, BrokerError):
        return exc
    name = type(exc).__name__
    code = getattr(exc, "code", None)
    if isinstance(exc, kex.TokenException):
        return BrokerError(BrokerErrorKind.AUTH, str(exc), code=code, error_type=name)
    if isinstance(exc, (kex.InputException, kex.OrderException, kex.PermissionException)):
        return BrokerError(BrokerErrorKind.FINAL, str(exc), code=code, error_type=name)
    if isinstance(exc, kex.NetworkException):
        # 429 and gateway errors: Kite rejects before the order reaches the book.
        return BrokerError(BrokerErrorKind.RETRYABLE, str(exc), code=code, error_type=name)
    if isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.ReadTimeout):
        # A refused or reset connection; on POST the body may have gone out already.
        kind = BrokerErrorKind.AMBIGUOUS if sent_order else BrokerErrorKind.RETRYABLE
        return BrokerError(kind, f"connection error: {type(exc).__name__}", error_type=name)
    if isinstance(exc, requests.Timeout):
        kind = BrokerErrorKind.AMBIGUOUS if sent_order else BrokerErrorKind.RETRYABLE
        return BrokerError(kind, "broker did not answer in time", error_type=name)
    if isinstance(exc, (kex.GeneralException, kex.DataException, kex.KiteException)):
        kind = BrokerErrorKind.AMBIGUOUS if sent_order else BrokerErrorKind.RETRYABLE
        return BrokerError(kind, str(exc), code=code, error_type=name)
    if isinstance(exc, TimeoutError):  # asyncio's, raised by libs.broker.kite_rest (aiohttp)
        kind = BrokerErrorKind.AMBIGUOUS if sent_order else BrokerErrorKind.RETRYABLE
        return BrokerError(kind, "broker did not answer in time", error_type=name)
    if isinstance(exc, (requests.RequestException, aiohttp.ClientError)):
        kind = BrokerErrorKind.AMBIGUOUS if sent_order else BrokerErrorKind.RETRYABLE
        return BrokerError(kind, f"request failed: {type(exc).__name__}", error_type=name)
    return BrokerError(BrokerErrorKind.AMBIGUOUS if sent_order else BrokerErrorKind.RETRYABLE,
                       f"unexpected error: {type(exc).__name__}", error_type=name)


def api_key_fingerprint(api_key: str) -> str:
    """Return a short, non-reversible id of an api_key (for rate-limit keys and logs)."""
    return hashlib.sha256(b"tickwise-api-key:" + api_key.encode()).hexdigest()[:16]


class _Adapter(requests.adapters.HTTPAdapter):
    """HTTP adapter that verifies TLS against a CA bundle chosen once (not per request)."""

    def __init__(self, ca_bundle: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ca_bundle = ca_bundle

    def send(self, request: Any, stream: bool = False, timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Any = None) -> Any:
        if verify is True and self._ca_bundle:
            verify = self._ca_bundle
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)


def broker_environment(root: str | None) -> tuple[dict[str, str], str | None]:
    """Return the proxies and CA bundle requests would take from the environment for `root`."""
    url = root or KiteConnect._default_root_uri
    proxies = dict(requests.utils.get_environ_proxies(url))
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
    return proxies, ca_bundle


class KiteGateway:
    """Async wrapper over `KiteConnect` clients, one per (api_key, access_token)."""

    def __init__(self, root: str | None = None, *, max_workers: int = 16, timeout_s: float = 7.0,
                 pool_size: int = 32, max_clients: int = 10_000) -> None:
        self.root = root
        self.timeout_s = timeout_s
        self.pool_size = pool_size
        self._proxies, self._ca_bundle = broker_environment(root)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kite")
        self._clients: OrderedDict[tuple[str, str], KiteConnect] = OrderedDict()
        self._lock = threading.Lock()
        self._max_clients = max_clients

    def client(self, api_key: str, access_token: str | None = None) -> KiteConnect:
        """Return a cached client; each keeps its own HTTP connection pool."""
        ident = (api_key, access_token or "")
        with self._lock:
            kite = self._clients.get(ident)
            if kite is not None:
                self._clients.move_to_end(ident)
                return kite
            kite = self._new_client(api_key, access_token)
            self._clients[ident] = kite
            while len(self._clients) > self._max_clients:
                _ident, evicted = self._clients.popitem(last=False)
                evicted.reqsession.close()  # release its pooled connections now, not at GC
            return kite

    def _new_client(self, api_key: str, access_token: str | None = None) -> KiteConnect:
        kwargs: dict[str, Any] = {"timeout": self.timeout_s, "proxies": self._proxies}
        if self.root:
            kwargs["root"] = self.root
        kite = KiteConnect(api_key, access_token=access_token, **kwargs)
        # The environment was read once in __init__; per request it costs ~0.15 ms of CPU.
        kite.reqsession.trust_env = False
        # kiteconnect mounts its pool only for https://; the paper broker speaks http.
        adapter = _Adapter(self._ca_bundle, pool_connections=4, pool_maxsize=self.pool_size, max_retries=0)
        kite.reqsession.mount("https://", adapter)
        kite.reqsession.mount("http://", adapter)
        return kite

    async def _call(self, fn: Callable[[], T], *, sent_order: bool = False) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except Exception as exc:  # classified right here, once
            raise classify(exc, sent_order=sent_order) from exc

    async def profile(self, api_key: str, access_token: str) -> dict[str, Any]:
        kite = self.client(api_key, access_token)
        return await self._call(kite.profile)

    async def generate_session(self, api_key: str, request_token: str, api_secret: str) -> dict[str, Any]:
        """Exchange a request token for an access token (the daily Kite login)."""
        kite = self._new_client(api_key)
        return await self._call(lambda: kite.generate_session(request_token, api_secret=api_secret))

    async def instruments(self, api_key: str, access_token: str, exchange: str = "NSE") -> list[dict[str, Any]]:
        kite = self.client(api_key, access_token)
        return await self._call(lambda: kite.instruments(exchange))

    async def positions(self, api_key: str, access_token: str) -> dict[str, Any]:
        """Return the account's positions: `{"net": [...], "day": [...]}` (the dashboard, off the order path)."""
        kite = self.client(api_key, access_token)
        return await self._call(kite.positions)

    async def orders(self, api_key: str, access_token: str) -> list[dict[str, Any]]:
        """Return the day's order book, off the order path: the API squares off a run that ended
        holding from it, and the dashboard matches positions to tags with it."""
        kite = self.client(api_key, access_token)
        # = kite.orders() minus dateutil: timestamps stay the broker's strings.
        return await self._call(lambda: kite._get("orders"))

    async def ltp(self, api_key: str, access_token: str, instruments: list[str]) -> dict[str, Any]:
        kite = self.client(api_key, access_token)
        return await self._call(lambda: kite.ltp(instruments))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for kite in self._clients.values():
                kite.reqsession.close()
            self._clients.clear()


# Kite's final order statuses: nothing more will fill.
TERMINAL = frozenset({"COMPLETE", "REJECTED", "CANCELLED"})


def filled_quantity(order: dict[str, Any]) -> int:
    """Return the shares an order filled (a COMPLETE order without the field filled all it asked).

    A CANCELLED or REJECTED order may have filled part of its quantity first:
    those shares are held all the same.
    """
    filled = int(order.get("filled_quantity") or 0)
    if not filled and order.get("status") == "COMPLETE":
        return int(order.get("quantity") or 0)
    return filled


def carries_tag(order: dict[str, Any], tag: str) -> bool:
    """Tell whether a broker order carries `tag` (Kite answers `tag`, and `tags` on newer accounts)."""
    return order.get("tag") == tag or tag in (order.get("tags") or [])
