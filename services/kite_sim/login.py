"""Kite's browser login, simulated: `/connect/login` shows one button, then redirects like Kite.

`GET /connect/login?v=3&api_key=...&redirect_params=...` renders a minimal page
for the paper account; its one button posts back, a fresh request_token is
issued, and the browser is redirected (302) to the redirect URL registered for
the account (`POST /sim/accounts {"redirect_url": ...}`) with
`action=login&type=login&status=success&request_token=...` and the decoded
redirect_params appended as query parameters, as Kite does.
"""

from __future__ import annotations

import html
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog
from aiohttp import web

from services.kite_sim.book import Account, Book

log = structlog.get_logger("kite_sim")

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Kite (paper) login</title></head>
<body style="font-family: sans-serif; max-width: 28em; margin: 4em auto">
<h1>Kite login (paper broker)</h1>
<p>Log in to <strong>{user_name}</strong> ({user_id}) for the app with api_key ending
<code>{key_tail}</code>.</p>
<form method="post" action="/connect/login">
<input type="hidden" name="api_key" value="{api_key}">
<input type="hidden" name="redirect_params" value="{redirect_params}">
<button type="submit" id="login">Log in</button>
</form></body></html>
"""


def _page(status: int, message: str) -> web.Response:
    body = f"<!doctype html><html><body><h1>Kite login</h1><p>{html.escape(message)}</p></body></html>"
    return web.Response(status=status, text=body, content_type="text/html")


class KiteLogin:
    """Serve the browser login of the paper accounts."""

    def __init__(self, book: Book) -> None:
        self.book = book

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/connect/login", self.show), web.post("/connect/login", self.finish)]

    def _account(self, api_key: str) -> Account | web.Response:
        account = self.book.accounts.get(api_key)
        if account is None:
            return _page(400, "Invalid api_key.")
        if not account.redirect_url:
            return _page(400, "No redirect URL is registered for this app.")
        return account

    async def show(self, request: web.Request) -> web.Response:
        """Render the login page (one button)."""
        account = self._account(request.query.get("api_key", ""))
        if isinstance(account, web.Response):
            return account
        return web.Response(text=_PAGE.format(
            user_name=html.escape(account.user_name), user_id=html.escape(account.user_id),
            key_tail=html.escape(account.api_key[-4:]), api_key=html.escape(account.api_key, quote=True),
            redirect_params=html.escape(request.query.get("redirect_params", ""), quote=True)),
            content_type="text/html")

    async def finish(self, request: web.Request) -> web.Response:
        """Log the user in: issue a request_token and redirect to the app's redirect URL."""
        form = await request.post()
        account = self._account(str(form.get("api_key", "")))
        if isinstance(account, web.Response):
            return account
        assert account.redirect_url is not None
        token = self.book.issue_request_token(account)
        params = [("action", "login"), ("type", "login"), ("status", "success"), ("request_token", token)]
        params += parse_qsl(str(form.get("redirect_params", "")), keep_blank_values=True)
        parts = urlsplit(account.redirect_url)
        query = "&".join(q for q in (parts.query, urlencode(params)) if q)
        log.info("login redirect", user_id=account.user_id)
        raise web.HTTPFound(urlunsplit((parts.scheme, parts.netloc, parts.path, query, "")))
