"""Describe every route once (`Op`) and build the OpenAPI 3.1 document from the pydantic models.

The same `Op` list registers the aiohttp routes, so the document cannot miss
one. Schemas come from `model_json_schema` (JSON Schema 2020-12, which
OpenAPI 3.1 uses as is) through `models_json_schema`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from libs.schema.models import ErrorResponse
from services.api.deps import authenticate

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REASONS = {
    400: "Body is empty or not JSON", 401: "Missing, invalid or expired bearer token",
    404: "No such resource (or it belongs to someone else)", 409: "Conflicts with the resource's state",
    413: "Body larger than the configured limit", 422: "Body or query failed validation (field paths in details)",
    429: "Too many failed logins", 503: "A dependency (Redis, Postgres, broker) is unavailable",
}


@dataclass(frozen=True)
class Op:
    """One HTTP operation: route, handler and what it takes and returns."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    status: int = 200
    response: type[BaseModel] | None = None
    many: bool = False
    auth: bool = True
    errors: tuple[int, ...] = ()
    query: tuple[dict[str, Any], ...] = ()
    media_type: str = "application/json"
    raw_schema: dict[str, Any] = field(default_factory=dict)
    redirect: str | None = None  # a 303 the operation answers browsers with, described here

    @property
    def operation_id(self) -> str:
        return self.handler.__module__.rsplit(".", 1)[-1] + "_" + self.handler.__name__

    def statuses(self) -> list[int]:
        codes = set(self.errors)
        if self.auth:
            codes.add(401)
        if self.body is not None:
            codes |= {400, 413, 422}
        if "{" in self.path:
            codes.add(404)
        return sorted(codes)


def _model_refs(ops: list[Op]) -> tuple[dict[tuple[type[BaseModel], str], dict], dict[str, Any]]:
    wanted: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [(ErrorResponse, "serialization")]
    for op in ops:
        if op.body is not None:
            wanted.append((op.body, "validation"))
        if op.response is not None:
            wanted.append((op.response, "serialization"))
    refs, defs = models_json_schema(list(dict.fromkeys(wanted)), ref_template="#/components/schemas/{model}")
    return refs, defs.get("$defs", {})


def build_openapi(ops: list[Op], *, title: str = "Tickwise API", version: str = "1.0.0") -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of `ops`."""
    refs, schemas = _model_refs(ops)
    error_ref = refs[(ErrorResponse, "serialization")]
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        item = paths.setdefault(op.path, {})
        operation: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag]}
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
                  for name in _path_params(op.path)]
        params += list(op.query)
        if params:
            operation["parameters"] = params
        if op.body is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": refs[(op.body, "validation")]}}}
        operation["responses"] = {str(op.status): _success(op, refs)}
        if op.redirect:
            operation["responses"]["303"] = {"description": op.redirect, "headers": {
                "Location": {"schema": {"type": "string"}, "description": "Where the browser goes next."}}}
        for code in op.statuses():
            operation["responses"][str(code)] = {"description": _REASONS.get(code, "Error"),
                                                 "content": {"application/json": {"schema": error_ref}}}
        operation["security"] = [{"bearerAuth": []}] if op.auth else []
        item[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Scheduled intraday trades on Zerodha Kite Connect. Every error is "
                                "`{\"error\": {\"code\", \"message\", \"details\"}}`."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                                          "bearerFormat": "JWT"}}},
    }


def _success(op: Op, refs: dict) -> dict[str, Any]:
    if op.status == 204:
        return {"description": "No content"}
    if op.response is not None:
        schema = refs[(op.response, "serialization")]
        if op.many:
            schema = {"type": "array", "items": schema}
    else:
        schema = op.raw_schema or {"type": "object"}
    return {"description": op.summary, "content": {op.media_type: {"schema": schema}}}


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def add_routes(app: web.Application, ops: list[Op]) -> None:
    """Register every operation on the app; an operation with `auth` checks the bearer token first."""
    app.add_routes([web.route(op.method, op.path, _authenticated(op.handler) if op.auth else op.handler)
                    for op in ops])


def _authenticated(handler: Handler) -> Handler:
    async def checked(request: web.Request) -> web.StreamResponse:
        await authenticate(request)
        return await handler(request)

    checked.__name__ = handler.__name__
    return checked
