"""The HTTP edge below the app: requests aiohttp refuses before any handler runs.

A request line or header too long, a malformed request or an invalid method is
answered by aiohttp's connection handler itself, as plain text and with a
traceback in the log. `JsonErrorRunner` serves those in the API's one JSON
error shape and logs one line without a traceback.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from libs.service.logging import get_logger

log = get_logger("api")


class _JsonErrorRequestHandler(RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        if status >= 500:
            code, text = "internal_error", "internal server error"
        else:
            code, text = "bad_request" if status == 400 else phrase.lower().replace(" ", "_"), \
                str(getattr(exc, "message", None) or message or phrase)[:200]
        log.warning("request refused before routing", status=status, error=type(exc).__name__ if exc else None,
                    reason=text)
        body = orjson.dumps({"error": {"code": code, "message": text, "details": None}})
        response = web.Response(status=status, body=body, content_type="application/json",
                                headers={"X-Content-Type-Options": "nosniff"})
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """An AppRunner whose connections answer pre-routing errors as JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same state; only the connection handler class differs
        return server
