"""Follow Kite's browser login on the paper broker with a plain HTTP client (no browser needed)."""

from __future__ import annotations

import html
import re

import aiohttp

_HIDDEN = re.compile(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">')


async def press_login(http: aiohttp.ClientSession, login_url: str) -> str:
    """Open the simulator's login page, press its button; return where Kite redirects the browser."""
    async with http.get(login_url) as page:
        assert page.status == 200, await page.text()
        text = await page.text()
    form = {name: html.unescape(value) for name, value in _HIDDEN.findall(text)}
    assert set(form) == {"api_key", "redirect_params"}, text
    action = login_url.split("/connect/login", 1)[0] + "/connect/login"
    async with http.post(action, data=form, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]
