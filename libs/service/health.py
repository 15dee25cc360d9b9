"""/healthz, /readyz and /metrics for every process, on a small aiohttp server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], Awaitable[None]]
"""An async check that raises when a dependency does not answer."""

HealthProbe = Callable[[], dict[str, object]]
"""A sync probe returning extra health fields; `{"ok": False, ...}` makes /healthz 503."""


class HealthServer:
    """Serve health, readiness and Prometheus metrics; stop() is idempotent."""

    def __init__(self, host: str, port: int, *, service: str,
                 checks: dict[str, ReadinessCheck] | None = None,
                 probe: HealthProbe | None = None,
                 registry: CollectorRegistry = REGISTRY, check_timeout_s: float = 2.0) -> None:
        self.host, self.port, self.service = host, port, service
        self.checks = dict(checks or {})
        self.probe = probe
        self.registry = registry
        self.check_timeout_s = check_timeout_s
        self._runner: web.AppRunner | None = None

    def routes(self) -> list[web.RouteDef]:
        """Return the three routes, for services that mount them on their own app."""
        return [
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
        ]

    async def healthz(self, _request: web.Request) -> web.Response:
        body: dict[str, object] = {"status": "ok", "service": self.service}
        if self.probe is not None:
            extra = self.probe()
            body.update(extra)
            if extra.get("ok") is False:
                body["status"] = "degraded"
                return web.json_response(body, status=503)
        return web.json_response(body)

    async def readyz(self, _request: web.Request) -> web.Response:
        results: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                await asyncio.wait_for(check(), self.check_timeout_s)
                results[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                results[name] = f"error: {type(exc).__name__}"
        ready = all(v == "ok" for v in results.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": results}, status=200 if ready else 503
        )

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int:
        """Start serving; return the bound port."""
        app = web.Application()
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # aiohttp exposes no public accessor
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
