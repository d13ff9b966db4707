"""A fix for BentoML's per-request timeout, which holds every request in memory for its length.

BentoML (1.4.x) enforces ``traffic.timeout`` with ``TimeoutMiddleware``, which schedules
``loop.call_later(timeout, ...)`` for each request and never cancels it. The timer keeps the
request's context alive, and with it the request, its tracing span and any body the handler
did not read, for the whole timeout (600 s here) after the response has gone: under a stream of
quickly refused requests (429 under overload) the API worker grew by about 1.9 MB/s in a
10-minute soak (docs/reliability.md). :func:`patch_timeout_middleware` replaces the middleware's
``__call__`` with the same logic, but the timer is scheduled in an empty context and cancelled
as soon as the request is over. The traffic timeout can't simply be turned off: BentoML's
config schema requires it to be positive.
"""

from __future__ import annotations

import asyncio
import contextvars

from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send


async def _call(self: TimeoutMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    # BentoML's own logic: wait for the first response message or the timeout, whichever is
    # first; on timeout, cancel the handler and answer 504 if it had not started answering.
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(
        self.timeout, self._set_timer_out, waiter, context=contextvars.Context()
    )

    async def _send(message: Message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    handler = asyncio.ensure_future(self.app(scope, receive, _send))
    try:
        await waiter
    except TimeoutError:
        if handler.cancel():
            response = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"},
                status_code=504,
            )
            await response(scope, receive, send)
    else:
        await handler
    finally:
        timer.cancel()


def patch_timeout_middleware() -> None:
    """Install :func:`_call` as ``TimeoutMiddleware.__call__`` (idempotent)."""
    TimeoutMiddleware.__call__ = _call  # type: ignore[method-assign]
