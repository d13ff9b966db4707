"""API docs that work offline, and no third-party script in any page the service serves.

FastAPI's stock ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from a CDN (a blank page
without the internet), and BentoML answers ``/`` with its own page, which embeds a Google Tag
Manager snippet. Here ``/docs`` (Swagger UI) and ``/redoc`` are served with the assets that the
``fastapi-offline`` package ships, from ``/docs/assets``, and :class:`HomeRedirect` sends ``/``
to a page of ours (the playground).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

ASSETS = "/docs/assets"
# Swagger UI's default validatorUrl makes the page load a badge from validator.swagger.io.
SWAGGER_PARAMETERS = {"validatorUrl": None, "tryItOutEnabled": True}
# Nothing but this origin, so no asset can reach elsewhere: ReDoc's bundle, for one, shows a
# logo from cdn.redoc.ly. The pages' own inline script and the viewers' inline styles stay.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:"
)


def add_docs(app: FastAPI) -> None:
    """``/docs``, ``/redoc`` and their assets; ``app`` must be created with ``docs_url=None``
    and ``redoc_url=None`` (FastAPI's own pages use the CDN)."""
    app.mount(ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
    app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)


async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return _same_origin_only(
        get_swagger_ui_html(
            openapi_url=root + request.app.openapi_url,
            title=f"{request.app.title} API",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )
    )


async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return _same_origin_only(
        get_redoc_html(
            openapi_url=root + request.app.openapi_url,
            title=f"{request.app.title} API",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
    )


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


def _root(request: Request) -> str:
    # Behind a proxy that strips a prefix (root_path), the assets live under that prefix.
    return request.scope.get("root_path", "").rstrip("/")


class HomeRedirect:
    """ASGI middleware for the BentoML service: ``GET /`` redirects to ``home`` instead of
    reaching BentoML's stock index page (which the mounted app cannot override: BentoML's
    own ``/`` route is matched first)."""

    def __init__(self, app: ASGIApp, home: str = "/docs") -> None:
        self.app, self.home = app, home

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            target = scope.get("root_path", "").rstrip("/") + self.home
            await RedirectResponse(target, status_code=307)(scope, receive, send)
            return
        await self.app(scope, receive, send)
