"""Send one notification: a signed webhook POST or a Telegram Bot API message.

Webhook bodies are signed: `X-Tickwise-Signature: v1=hex(HMAC-SHA256(secret,
"{X-Tickwise-Timestamp}.{body}"))`, with the notice id in `X-Tickwise-Event-Id`
for the receiver's deduplication. Unless allowed, a webhook whose host
resolves to a loopback, private or link-local address is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

import aiohttp

from libs.schema.models.notify import Notice
from services.api.settings import ApiSettings


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Return the webhook signature header value of a body sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return "v1=" + digest


class RefusedTarget(Exception):
    """The webhook points somewhere this deployment must not call (loopback, private ranges)."""


class Senders:
    """The two channels, over one HTTP session with a per-call timeout."""

    def __init__(self, settings: ApiSettings, http: aiohttp.ClientSession) -> None:
        self.settings, self.http = settings, http
        allowed = settings.notify_allow_private_targets
        self.allow_private = bool(settings.kite_root) if allowed is None else allowed

    async def webhook(self, url: str, secret: str, notice: Notice) -> None:
        """POST the notice, signed; raise unless the receiver answers 2xx."""
        await self._check_target(url)
        body = notice.model_dump_json().encode()
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "Tickwise-Webhook/1",
                   "X-Tickwise-Event-Id": notice.id, "X-Tickwise-Event": notice.type,
                   "X-Tickwise-Timestamp": stamp, "X-Tickwise-Signature": sign(secret, stamp, body)}
        async with self.http.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            if not 200 <= resp.status < 300:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                  message=f"receiver answered {resp.status}")

    async def telegram(self, chat_id: str, notice: Notice) -> None:
        """Send the notice's text to the chat through the operator's bot."""
        base = self.settings.telegram_api_base.rstrip("/")
        url = f"{base}/bot{self.settings.telegram_bot_token}/sendMessage"
        async with self.http.post(url, json={"chat_id": chat_id, "text": notice.text(),
                                             "disable_web_page_preview": True}) as resp:
            await resp.read()
            if not 200 <= resp.status < 300:
                # The URL holds the bot token: never put it in the error.
                raise ValueError(f"Telegram answered {resp.status}")

    async def _check_target(self, url: str) -> None:
        if self.allow_private:
            return
        parts = urlsplit(url)
        host = parts.hostname or ""
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        for info in infos:
            if not ipaddress.ip_address(info[4][0]).is_global:
                raise RefusedTarget(f"webhook host {host} resolves to a non-public address")
