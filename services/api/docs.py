"""The interactive API reference at `/docs`: Swagger UI from the `swagger-ui-py` package, no CDN.

The page, its one-line initialiser and Swagger UI's own bundle are served by
the API itself, so the reference works offline and under a strict CSP
(scripts from this origin only). "Authorize" takes the bearer token from
`POST /api/v1/auth/login`.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from aiohttp import web

from services.api.openapi import Op

# Located, not imported: the package's own modules wire other web frameworks, which we do not need.
_SPEC = importlib.util.find_spec("swagger_ui")
assert _SPEC is not None and _SPEC.submodule_search_locations, "swagger-ui-py is not installed"
ASSETS = Path(next(iter(_SPEC.submodule_search_locations))) / "static"
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "no-referrer", "Content-Security-Policy": DOCS_CSP}

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tickwise API reference</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script><script src="/docs/init.js"></script></body></html>
"""
INIT = b"""window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  persistAuthorization: false, tryItOutEnabled: false, displayRequestDuration: true });
"""


@functools.cache
def _asset(name: str) -> bytes:
    return (ASSETS / name).read_bytes()


async def docs_page(_request: web.Request) -> web.Response:
    """Serve the Swagger UI page."""
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8", headers=HEADERS)


async def docs_init(_request: web.Request) -> web.Response:
    """Serve the initialiser that points Swagger UI at /openapi.json."""
    return web.Response(body=INIT, content_type="application/javascript", charset="utf-8", headers=HEADERS)


async def docs_bundle(_request: web.Request) -> web.Response:
    """Serve Swagger UI's script bundle (from the installed package)."""
    return web.Response(body=_asset("swagger-ui-bundle.js"), content_type="application/javascript",
                        charset="utf-8", headers=HEADERS)


async def docs_css(_request: web.Request) -> web.Response:
    """Serve Swagger UI's stylesheet (from the installed package)."""
    return web.Response(body=_asset("swagger-ui.css"), content_type="text/css", charset="utf-8", headers=HEADERS)


def docs_ops() -> list[Op]:
    """Return the routes of the API reference."""
    text = {"type": "string"}
    return [
        Op("GET", "/docs", docs_page, "Interactive API reference (Swagger UI)", "meta", auth=False,
           media_type="text/html", raw_schema=text),
        Op("GET", "/docs/init.js", docs_init, "API reference initialiser", "meta", auth=False,
           media_type="application/javascript", raw_schema=text),
        Op("GET", "/docs/swagger-ui-bundle.js", docs_bundle, "Swagger UI script", "meta", auth=False,
           media_type="application/javascript", raw_schema=text),
        Op("GET", "/docs/swagger-ui.css", docs_css, "Swagger UI stylesheet", "meta", auth=False,
           media_type="text/css", raw_schema=text),
    ]
