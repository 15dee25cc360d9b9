"""The daily Kite login: a login link with a signed state, the redirect callback, token checks.

`GET /broker/login` answers Kite's login URL for the caller's api_key with a
`state` in Kite's `redirect_params`. Kite sends the browser back to the app's
registered redirect URL (`GET /broker/callback`) with `request_token`,
`status` and the redirect_params as query parameters. The state is
`base64url(payload).base64url(HMAC-SHA256)`; its payload binds the Tickwise
user, the Kite api_key (fingerprint), a nonce and an expiry. The callback
refuses a bad signature, an expired state, a replay (the nonce is SET NX in
Redis before the exchange, so two racing callbacks cannot both exchange), and,
when the browser also presents a bearer token, another user's state. It then
exchanges the request_token with the stored api_secret, stores the new access
token encrypted (state `valid`: flags clear at once) and redirects the browser
to the dashboard with `?broker_login=success` or `?broker_login=error&code=..`.
A client asking for JSON (`Accept: application/json`) gets JSON instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import orjson
import structlog
from aiohttp import web

from libs.broker.kite import BrokerError, BrokerErrorKind
from libs.schema import keys
from libs.schema.models import BrokerConnectOut, BrokerLoginOut
from libs.service.logging import register_secret, scrub
from libs.trading.tokens import TokenChecker, TokenState
from services.api.broker import _store, broker_unavailable, credentials_invalid, load_credentials
from services.api.deps import BOX, GATEWAY, REDIS, SESSIONS, SETTINGS, TOKENS, authenticate, current_user
from services.api.errors import ApiError, json_response

log = structlog.get_logger("api")

STATE_PURPOSE = b"kite-login-state-v1"
_PRINTABLE = frozenset(range(0x21, 0x7F))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_state(key: bytes, user_id: UUID, api_key_fp: str, ttl_s: int, now: float | None = None) -> str:
    """Return a signed login state for the user and Kite account, valid for ttl_s."""
    payload = orjson.dumps({"u": str(user_id), "f": api_key_fp, "n": secrets.token_urlsafe(16),
                            "e": int((now or time.time()) + ttl_s)})
    return _b64(payload) + "." + _b64(hmac.new(key, payload, hashlib.sha256).digest())


def verify_state(key: bytes, state: str, now: float | None = None) -> dict[str, Any]:
    """Return the state's payload; raise ApiError if forged, malformed or expired."""
    try:
        body, _, mac = state.partition(".")
        payload = _unb64(body)
        good = hmac.compare_digest(_unb64(mac), hmac.new(key, payload, hashlib.sha256).digest())
        data = orjson.loads(payload) if good else None
        if isinstance(data, dict):
            UUID(str(data["u"]))
    except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
        good, data = False, None
    if not good or not isinstance(data, dict):
        raise ApiError(400, "login_state_invalid", "the login link is not one Tickwise issued; start the "
                                                   "login again from the dashboard")
    if int(data.get("e", 0)) < (now or time.time()):
        raise ApiError(400, "login_state_expired", "the login link expired; start the login again")
    return data


async def login(request: web.Request) -> web.Response:
    """Answer the Kite login URL for the caller's api_key, carrying a signed single-use state."""
    app = request.app
    user_id = current_user(request)
    async with app[SESSIONS]() as session:
        creds = await load_credentials(app, session, user_id)
    if creds is None:
        raise ApiError(409, "broker_not_connected", "connect your broker first: POST /api/v1/broker/connect")
    settings = app[SETTINGS]
    state = sign_state(app[TOKENS].derive(STATE_PURPOSE), user_id, creds.api_key_fp, settings.login_state_ttl_s)
    query = urlencode({"v": 3, "api_key": creds.api_key, "redirect_params": urlencode({"state": state})})
    log.info("kite login link issued", user_id=str(user_id), api_key_fp=creds.api_key_fp)
    out = BrokerLoginOut(login_url=f"{settings.login_root}/connect/login?{query}",
                         state_expires_in=settings.login_state_ttl_s)
    return json_response(out.model_dump(mode="json"))


async def callback(request: web.Request) -> web.StreamResponse:
    """Finish the Kite login redirect: check the state, exchange the request_token, back to the dashboard."""
    wants_json = "application/json" in request.headers.get("Accept", "") and \
        "text/html" not in request.headers.get("Accept", "")
    try:
        out = await _finish_login(request)
    except ApiError as exc:
        log.warning("kite login refused", code=exc.code, reason=exc.message)
        if wants_json:
            raise
        return _back_to_dashboard(request, {"broker_login": "error", "code": exc.code, "message": exc.message})
    if wants_json:
        return json_response(out.model_dump(mode="json"))
    return _back_to_dashboard(request, {"broker_login": "success"})


def _back_to_dashboard(request: web.Request, params: dict[str, str]) -> web.Response:
    target = request.app[SETTINGS].dashboard_url
    sep = "&" if "?" in target else "?"
    return web.Response(status=303, headers={"Location": target + sep + urlencode(params),
                                             "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


async def _finish_login(request: web.Request) -> BrokerConnectOut:
    app = request.app
    query = request.query
    data = verify_state(app[TOKENS].derive(STATE_PURPOSE), query.get("state", ""))
    user_id = UUID(data["u"])
    if request.headers.get("Authorization") and await authenticate(request) != user_id:
        raise ApiError(403, "login_state_other_user", "this login link belongs to another Tickwise user")
    ttl = max(1, int(data["e"] - time.time()) + 60)
    used = keys.broker_login_state_key(str(data["n"]))
    if not await app[REDIS].set(used, "used", nx=True, ex=ttl):
        raise ApiError(409, "login_state_replayed", "this login link was already used; start the login again")
    if query.get("status") != "success" or query.get("action", "login") != "login":
        raise ApiError(400, "broker_login_failed", f"Kite did not complete the login (status "
                                                   f"{scrub(query.get('status', 'missing'))[:40]})")
    request_token = query.get("request_token", "")
    if not request_token or len(request_token) > 200 or not set(request_token.encode()) <= _PRINTABLE:
        raise ApiError(400, "request_token_missing", "Kite sent no usable request_token; log in again")
    register_secret(request_token)
    async with app[SESSIONS]() as session:
        creds = await load_credentials(app, session, user_id)
    if creds is None or creds.api_key_fp != data["f"]:
        raise ApiError(409, "login_state_stale", "the Kite account changed since this login began; log in again")
    try:
        session_data = await app[GATEWAY].generate_session(creds.api_key, request_token, creds.api_secret)
    except BrokerError as exc:
        if exc.kind not in (BrokerErrorKind.AUTH, BrokerErrorKind.FINAL):
            # No answer: the same link may be retried (Kite refuses a request_token it already took).
            await app[REDIS].delete(used)
            raise broker_unavailable(exc) from None
        raise ApiError(422, "broker_session_rejected", f"Kite refused the login: {scrub(exc.message)}",
                       {"broker_error": exc.error_type}) from None
    access_token = str(session_data.get("access_token") or "")
    register_secret(access_token)
    if not access_token:
        raise ApiError(503, "broker_unavailable", "the broker returned no access token; retry")
    row = await _store(app, user_id, api_key=creds.api_key, api_secret=creds.api_secret,
                       access_token=access_token, is_valid=True, profile=session_data)
    log.info("broker session refreshed", user_id=str(user_id), api_key_fp=row.api_key_fp, via="kite_login")
    return BrokerConnectOut(is_valid=True, api_key_hint=row.api_key_hint, user_name=row.broker_user_name)


def token_checker(app: web.Application) -> TokenChecker:
    return TokenChecker(app[SESSIONS], app[REDIS], app[BOX], app[GATEWAY])


async def require_live_token(app: web.Application, user_id: UUID) -> None:
    """409 broker_credentials_invalid unless the broker accepts the stored token (cached briefly)."""
    check = await token_checker(app).check(user_id, max_age_s=app[SETTINGS].token_check_cache_s)
    if check is not None and check.state == TokenState.expired:
        raise credentials_invalid()
