"""Live dashboard updates as Server-Sent Events, authenticated by a short-lived stream ticket.

The browser's EventSource cannot send an Authorization header, so the page
first trades its bearer token for a ticket (`POST /api/v1/stream/ticket`):
an HS256 token under a key derived for this purpose only (a ticket is never
a bearer token, nor the reverse), naming the user and valid for
`stream_ticket_ttl_s` (60 s). It opens `GET /api/v1/stream?ticket=...`; a
reconnect after expiry gets 401, and the page asks for a new ticket. A
ticket in a URL can reach a proxy's log, which is why it is short-lived and
opens nothing but the caller's own stream. No cookie: the API stays free of
ambient credentials (no CSRF surface).

Each stream reads only the ticket's user's rows and keys, and pushes:
`strategies` (the list with status, position, last price and P&L, when it
changes), `orders` (new order-log rows) and `broker` (connection state, when
it changes); a comment every 15 s keeps proxies from closing an idle stream.
It reads Redis and Postgres every `stream_interval_s` (1 s): one pipeline
and four indexed queries per open stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import jwt
import orjson
import structlog
from aiohttp import web
from sqlalchemy import select

from libs.schema.models import OrderLogOut
from libs.schema.models.dashboard import StreamTicketOut
from libs.schema.tables import BrokerCredential, OrderLog
from libs.service.lifecycle import sleep_unless_stopped
from services.api.broker import broker_status
from services.api.deps import READS, SETTINGS, current_user
from services.api.errors import ApiError, json_response
from services.api.status import strategy_items

log = structlog.get_logger("api")

HEARTBEAT_S = 15.0
# Order-log rows reach Postgres in batches from several writers, not in created_at order:
# look back this far each time and skip the ids already sent.
ORDER_LOOKBACK = timedelta(seconds=60)
SEEN_MAX = 2000


class StreamTickets:
    """Issue and check stream tickets: HS256 under a key derived from the JWT secret for tickets only."""

    ALGORITHM = "HS256"
    AUDIENCE = "tickwise-stream"

    def __init__(self, jwt_secret: bytes, lifetime_s: int) -> None:
        self._key = hmac.new(jwt_secret, b"tickwise stream tickets v1", hashlib.sha256).digest()
        self.lifetime_s = lifetime_s

    def issue(self, user_id: UUID) -> str:
        now = int(time.time())
        claims = {"sub": str(user_id), "iat": now, "exp": now + self.lifetime_s, "aud": self.AUDIENCE}
        return jwt.encode(claims, self._key, algorithm=self.ALGORITHM)

    def user_id(self, ticket: str) -> UUID:
        """Return the user of a valid ticket; 401 otherwise."""
        try:
            claims = jwt.decode(ticket, self._key, algorithms=[self.ALGORITHM], audience=self.AUDIENCE,
                                options={"require": ["exp", "sub", "aud"]})
            return UUID(str(claims["sub"]))
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "ticket_expired", "the stream ticket has expired; ask for a new one") from None
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise ApiError(401, "invalid_ticket", "the stream ticket is invalid") from None


TICKETS = web.AppKey("stream_tickets", StreamTickets)
CLOSING = web.AppKey("streams_closing", asyncio.Event)


async def ticket(request: web.Request) -> web.Response:
    """Return a short-lived ticket that opens the caller's event stream."""
    user_id = current_user(request)
    tickets = request.app[TICKETS]
    value = tickets.issue(user_id)
    out = StreamTicketOut(ticket=value, expires_in=tickets.lifetime_s, url=f"/api/v1/stream?ticket={value}")
    return json_response(out.model_dump(mode="json"))


async def close_streams(app: web.Application) -> None:
    """On shutdown, end every open stream so the drain does not wait for them."""
    app[CLOSING].set()


async def stream(request: web.Request) -> web.StreamResponse:
    """Push the caller's strategies, order-log rows and broker state as they change."""
    user_id = request.app[TICKETS].user_id(request.query.get("ticket", ""))
    feed = _Feed(request.app, user_id)
    await feed.prime()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    settings, closing = request.app[SETTINGS], request.app[CLOSING]
    await response.write(b"retry: 3000\n\n")
    last_write = time.monotonic()
    log.info("stream opened", user_id=str(user_id))
    try:
        while not closing.is_set():
            events = await feed.changes()
            for name, data in events:
                await response.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")
            if events:
                last_write = time.monotonic()
            elif time.monotonic() - last_write >= HEARTBEAT_S:
                await response.write(b": keep-alive\n\n")
                last_write = time.monotonic()
            await sleep_unless_stopped(closing, settings.stream_interval_s)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        log.info("stream closed", user_id=str(user_id))
    return response


class _Feed:
    """What one user's stream last sent, and what changed since."""

    def __init__(self, app: web.Application, user_id: UUID) -> None:
        self.app, self.user_id = app, user_id
        self.sent: dict[str, bytes] = {}
        self.seen: dict[UUID, None] = {}
        self.since: datetime | None = None

    async def prime(self) -> None:
        """Mark the order-log rows that exist now as seen (the page loads them itself)."""
        async with self.app[READS]() as session:
            newest = await session.scalar(select(OrderLog.created_at).where(OrderLog.user_id == self.user_id)
                                          .order_by(OrderLog.created_at.desc()).limit(1))
            self.since = newest
            if newest is not None:
                ids = await session.scalars(select(OrderLog.id).where(
                    OrderLog.user_id == self.user_id, OrderLog.created_at >= newest - ORDER_LOOKBACK))
                self.seen = dict.fromkeys(ids)

    async def changes(self) -> list[tuple[str, Any]]:
        """Return the events to send now: every changed view of this user, and new order-log rows."""
        async with self.app[READS]() as session:
            rows, items = await strategy_items(self.app, session, self.user_id)
            broker = await session.get(BrokerCredential, self.user_id)
            orders = await self._new_orders(session)
        views = {
            "strategies": items,
            "broker": await broker_status(self.app, self.user_id, broker),
        }
        events: list[tuple[str, Any]] = []
        for name, data in views.items():
            encoded = orjson.dumps(data)
            if self.sent.get(name) != encoded:
                self.sent[name] = encoded
                events.append((name, data))
        if orders:
            symbols = {r.id: r.symbol for r in rows}
            events.append(("orders", [{**OrderLogOut.model_validate(o).model_dump(mode="json"),
                                       "symbol": symbols.get(o.strategy_id)} for o in orders]))
        return events

    async def _new_orders(self, session: Any) -> list[OrderLog]:
        stmt = select(OrderLog).where(OrderLog.user_id == self.user_id)
        if self.since is not None:
            stmt = stmt.where(OrderLog.created_at >= self.since - ORDER_LOOKBACK)
        fresh = [row for row in await session.scalars(stmt.order_by(OrderLog.created_at, OrderLog.id).limit(500))
                 if row.id not in self.seen]
        for row in fresh:
            self.seen[row.id] = None
            if self.since is None or row.created_at > self.since:
                self.since = row.created_at
        while len(self.seen) > SEEN_MAX:
            self.seen.pop(next(iter(self.seen)))
        return fresh
