"""Order updates as Kite sends them: WebSocket text messages and HTTP postbacks.

On every update the book announces (OPEN, TRIGGER PENDING, UPDATE for a
partial fill or a modification, COMPLETE, CANCELLED, REJECTED) the order's
JSON goes, with Kite's checksum sha256(order_id + order_timestamp +
api_secret), to the account's ticker connections as
`{"type": "order", "data": {...}}` (KiteTicker's `on_order_update`), and is
POSTed to the account's `postback_url` if it has one. Postbacks go through
a bounded queue drained by a few sender tasks, so a slow or dead endpoint
never delays order handling; when the queue is full the update is dropped
and counted (Kite, too, makes no delivery promise for postbacks).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import orjson
import structlog

from services.kite_sim.book import Order
from services.kite_sim.ticks import TickHub, has_connection, send_text_to_account

log = structlog.get_logger("kite_sim")

POSTBACK_QUEUE = 10_000
POSTBACK_SENDERS = 4
POSTBACK_TIMEOUT_S = 5.0


def order_update(order: Order, status: str) -> dict[str, Any]:
    """Return the order-update payload (the postback body) for an announced status."""
    data = order.as_kite()
    data["status"] = status
    account = order.account
    checksum = hashlib.sha256((order.order_id + data["order_timestamp"] + account.api_secret).encode()).hexdigest()
    data.update(user_id=account.user_id, app_id=int(account.user_id[2:] or 0), checksum=checksum,
                unfilled_quantity=data["pending_quantity"])
    return data


class OrderUpdates:
    """Fan announced order updates out to ticker connections and postback URLs."""

    def __init__(self, hub: TickHub) -> None:
        self.hub = hub
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(POSTBACK_QUEUE)
        self.sent = self.failed = self.dropped = 0

    def announce(self, order: Order, status: str) -> None:
        """Send one update; only does work if someone listens (the book calls this on its hot path)."""
        account = order.account
        url = account.postback_url
        to_ws = bool(self.hub.connections) and has_connection(self.hub, account.api_key)
        if not url and not to_ws:
            return
        data = order_update(order, status)
        if to_ws:
            send_text_to_account(self.hub, account.api_key, orjson.dumps({"type": "order", "data": data}).decode())
        if url:
            try:
                self.queue.put_nowait((url, orjson.dumps(data)))
            except asyncio.QueueFull:
                self.dropped += 1

    async def run(self) -> None:
        """Send postbacks until cancelled."""
        timeout = aiohttp.ClientTimeout(total=POSTBACK_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as group:
            for _ in range(POSTBACK_SENDERS):
                group.create_task(self._send_forever(session))

    async def _send_forever(self, session: aiohttp.ClientSession) -> None:
        while True:
            url, body = await self.queue.get()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    ok = resp.status < 400
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok = False
                log.warning("postback failed", error=type(exc).__name__)
            if ok:
                self.sent += 1
            else:
                self.failed += 1
