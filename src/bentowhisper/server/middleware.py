"""What stands in front of the routes: authentication, the upload limit, paths BentoML drops.

Each refusal is OpenAI's envelope with OpenAI's status (401, 413, 404).
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import NotFound, OpenAIError, PayloadTooLarge, Unauthorized


def authorize(request: HTTPConnection, keys: list[str], *, key: str = "") -> None:
    """Unauthorized unless the bearer token (else ``key``, which a WebSocket may carry in a
    subprotocol) is one of ``keys`` (none: no authentication)."""
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = (token.strip() if scheme.lower() == "bearer" else key).encode()
    # compare against every key, always, so timing says nothing about which prefix matched
    matches = [hmac.compare_digest(given, k.encode()) for k in keys]
    if not any(matches):
        raise Unauthorized(
            "Incorrect API key provided." if header or key else "Missing bearer API key."
        )


class BodyLimit:
    """Refuse bodies over the upload limit: at once when Content-Length says so, else as soon
    as the streamed body passes it, never buffering more than the limit. The limit is the
    hosting service's (``app.state.backend``); before it is set, nothing is limited."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        backend = scope.get("app") and getattr(scope["app"].state, "backend", None)
        if scope["type"] != "http" or backend is None:
            await self.app(scope, receive, send)
            return
        limit = backend.settings.max_upload_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error(PayloadTooLarge(_too_large(limit), param="file"), send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(_too_large(limit), param="file")
            return message

        await self.app(scope, limited, send)


class LineBreakPathNotFound:
    """For the BentoML service around the app: BentoML mounts the app at "/" with a pattern
    that does not match a path holding a line break (``%0A`` in the URL) and answers such a
    path with a plain-text 404 of its own; this answers it in OpenAI's envelope first."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "\n" in scope["path"]:
            await send_error(NotFound(f"Unknown path: {scope['path']!r}"), send)
            return
        await self.app(scope, receive, send)


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


async def send_error(error: OpenAIError, send: Send) -> None:
    """Answer with ``error`` from a middleware, below any route."""
    await error_response(error)({"type": "http"}, _no_body, send)


def _too_large(limit: int) -> str:
    return f"Maximum content size limit ({limit} bytes) exceeded."


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
