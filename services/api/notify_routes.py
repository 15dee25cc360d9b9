"""Each user's notification settings: webhook URL (its signing secret shown once), Telegram chat, a test send."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import structlog
from aiohttp import web
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError

from libs.schema.models.notify import Notice, NotificationSettingsIn, NotificationSettingsOut
from libs.schema.tables import NotificationSettings
from services.api.deps import BOX, READS, REDIS, SESSIONS, SETTINGS, current_user, read_model
from services.api.errors import ApiError, field_error, json_response
from services.api.notify import emit, new_webhook_secret, secret_aad

log = structlog.get_logger("api")


def _out(app: web.Application, row: NotificationSettings | None, secret: str | None = None) -> dict:
    out = NotificationSettingsOut(webhook_url=row.webhook_url if row else None,
                                  telegram_chat_id=row.telegram_chat_id if row else None,
                                  telegram_available=bool(app[SETTINGS].telegram_bot_token),
                                  webhook_secret=secret, updated_at=row.updated_at if row else None)
    return out.model_dump(mode="json")


async def get_settings(request: web.Request) -> web.Response:
    """Return where the caller's notifications go (never the secret)."""
    user_id = current_user(request)
    async with request.app[READS]() as session:
        row = await session.get(NotificationSettings, user_id)
    return json_response(_out(request.app, row))


async def put_settings(request: web.Request) -> web.Response:
    """Set the webhook URL and/or Telegram chat; a new webhook URL gets a new secret, shown in this answer only."""
    user_id = current_user(request)
    body = await read_model(request, NotificationSettingsIn)
    given = body.model_dump(exclude_unset=True)
    if "telegram_chat_id" in given and given["telegram_chat_id"] and not request.app[SETTINGS].telegram_bot_token:
        raise field_error(["telegram_chat_id"], "Telegram is not set up on this server (no bot token)",
                          "telegram_unavailable")
    async with request.app[SESSIONS]() as session:
        row = await session.get(NotificationSettings, user_id, with_for_update=True)
        values: dict = {}
        secret = None
        if "webhook_url" in given:
            url = str(body.webhook_url) if body.webhook_url is not None else None
            values["webhook_url"] = url
            if url is None:
                values |= {"webhook_secret": None, "key_id": None}
            elif row is None or row.webhook_url != url or not row.webhook_secret:
                secret = new_webhook_secret()
                values |= _encrypted(request.app, user_id, secret)
        if "telegram_chat_id" in given:
            values["telegram_chat_id"] = body.telegram_chat_id
        if values:
            stmt = insert(NotificationSettings).values(user_id=user_id, **values).on_conflict_do_update(
                index_elements=[NotificationSettings.user_id], set_={**values, "updated_at": func.now()})
            try:
                await session.execute(stmt)
                await session.commit()
            except IntegrityError:
                raise ApiError(401, "invalid_token", "the access token's user no longer exists") from None
        row = await session.get(NotificationSettings, user_id, populate_existing=True)
    log.info("notification settings changed", user_id=str(user_id), fields=sorted(given), new_secret=secret is not None)
    return json_response(_out(request.app, row, secret))


def _encrypted(app: web.Application, user_id: uuid.UUID, secret: str) -> dict:
    box = app[BOX]
    return {"webhook_secret": box.encrypt(secret, secret_aad(user_id)), "key_id": box.current_key_id}


async def rotate_secret(request: web.Request) -> web.Response:
    """Replace the webhook's signing secret; the new one is in this answer only."""
    user_id = current_user(request)
    secret = new_webhook_secret()
    async with request.app[SESSIONS]() as session:
        row = await session.get(NotificationSettings, user_id, with_for_update=True)
        if row is None or not row.webhook_url:
            raise ApiError(409, "no_webhook", "set a webhook URL first")
        for name, value in _encrypted(request.app, user_id, secret).items():
            setattr(row, name, value)
        await session.commit()
        await session.refresh(row)
    log.info("webhook secret rotated", user_id=str(user_id))
    return json_response(_out(request.app, row, secret))


async def send_test(request: web.Request) -> web.Response:
    """Queue a test notification to every configured channel of the caller."""
    user_id = current_user(request)
    notice = Notice(id=f"test-{uuid.uuid4()}", type="test", user_id=user_id, occurred_at=datetime.now(UTC))
    await emit(request.app[REDIS], notice)
    return json_response({"queued": notice.id}, status=202)
