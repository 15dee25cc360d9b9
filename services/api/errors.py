"""Map every failure to the one error shape `{"error": {"code", "message", "details"}}`.

Domain code raises `ApiError`; aiohttp's own HTTP exceptions (404, 405, 413)
and dependency outages are translated here, at the edge. Anything else is a
bug: it is logged with its traceback and answered with a bare 500.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.exceptions
import sqlalchemy.exc
import structlog
from aiohttp import web
from pydantic import ValidationError

from libs.schema.models import error_details
from libs.schema.models.messages import summary_message

log = structlog.get_logger("api")

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "validation_error", 429: "too_many_requests", 503: "service_unavailable",
}


class ApiError(Exception):
    """A client-facing failure with a stable machine code."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or {}


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def validation_error(error: ValidationError) -> ApiError:
    details = error_details(error)
    return ApiError(422, "validation_error", summary_message(details), details)


def field_error(loc: list[str | int], msg: str, type_: str, code: str = "validation_error") -> ApiError:
    """Return a 422 naming one field, shaped like pydantic's details."""
    return ApiError(422, code, msg, [{"loc": loc, "msg": msg, "type": type_}])


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers=headers)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn exceptions into JSON errors; never leak a traceback to the client."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = exc.reason if exc.status != 413 else "request body is too large"
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), message, None, headers)
    except redis.exceptions.RedisError as exc:
        log.warning("redis unavailable", error=type(exc).__name__, reason=str(exc)[:200])
        return error_response(503, "redis_unavailable", "the runtime store is unavailable; retry shortly")
    except (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError) as exc:
        # Client-caused database errors are caught where they happen (409/422); what reaches
        # here is the server's side (down, failover, a failed commit): retryable, not a bug.
        # Only the class and SQLSTATE: a Postgres message can quote a failing row (hashes, ciphertexts).
        log.warning("database unavailable", error=type(exc).__name__,
                    sqlstate=getattr(getattr(exc, "orig", None), "sqlstate", None))
        return error_response(503, "database_unavailable", "the database is unavailable; retry shortly")
    except Exception:
        # Last resort: tests and fuzzing must never get here.
        log.exception("unhandled error", path=request.path, method=request.method)
        return error_response(500, "internal_error", "internal server error")
