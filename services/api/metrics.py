"""Per-request plumbing: request id, JSON access log, Prometheus counters and latency."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.api.deps import USER_ID
from services.api.errors import error_response

log = structlog.get_logger("api.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """Request counters by route and status, and a latency histogram by route."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("tickwise_api_requests_total", "HTTP requests handled",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("tickwise_api_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_progress = Gauge("tickwise_api_requests_in_progress", "HTTP requests being handled",
                                 ["route"], registry=registry)


METRICS = web.AppKey("metrics", ApiMetrics)


def route_label(request: web.Request) -> str:
    """Return the route template (bounded label values), never the raw path."""
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None or getattr(info, "http_exception", None) is not None:
        return "unmatched"
    return resource.canonical


def request_id_of(request: web.Request) -> str:
    incoming = request.headers.get("X-Request-ID", "")
    return incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex


@web.middleware
async def request_context_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Bind a request id, time the request, count it, and write one access-log line."""
    request_id = request_id_of(request)
    started = time.perf_counter()
    metrics = request.app[METRICS]
    route, method = route_label(request), request.method
    with (structlog.contextvars.bound_contextvars(request_id=request_id),
          metrics.in_progress.labels(route).track_inprogress()):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:  # redirects etc. pass; errors are JSON already, this is a backstop
                response = error_response(exc.status, "http_error", exc.reason)
            else:
                raise
        except Exception:
            log.exception("unhandled error outside the error middleware")
            response = error_response(500, "internal_error", "internal server error")
        elapsed = time.perf_counter() - started
        metrics.requests.labels(method, route, str(response.status)).inc()
        metrics.latency.labels(method, route).observe(elapsed)
        if not response.prepared:
            response.headers["X-Request-ID"] = request_id
        user_id = request.get(USER_ID)
        log.info("request handled", method=method, path=request.path, route=route, status=response.status,
                 duration_ms=round(elapsed * 1000, 2), remote=request.remote,
                 user_id=str(user_id) if user_id else None)
    return response
