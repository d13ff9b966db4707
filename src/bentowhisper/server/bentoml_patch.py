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

The patch replaces a private BentoML method, so it applies only where that method is still the
one this was written against (BentoML 1.4, a ``__call__`` that arms ``call_later`` with
``_set_timer_out``); elsewhere it logs an error and leaves BentoML's code alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging

import bentoml
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)
SUPPORTED_VERSIONS = ("1.4.",)  # BentoML releases whose TimeoutMiddleware this was checked on


async def _call(self: object, scope: Scope, receive: Receive, send: Send) -> None:
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
        # BentoML awaits the waiter alone: a handler that ended without answering (its client
        # gone) then held the request until the timeout, which answered nothing either.
        await asyncio.wait({waiter, handler}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            waiter.result()  # TimeoutError when the timer fired first
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


def patch_timeout_middleware() -> bool:
    """Install :func:`_call` as ``TimeoutMiddleware.__call__`` (idempotent); False, with an
    error in the log, where BentoML's code is not the one this patch replaces."""
    try:
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
    except ImportError as exc:
        return _refuse(f"TimeoutMiddleware not found ({exc})")
    current = TimeoutMiddleware.__dict__.get("__call__")
    if current is _call:
        return True
    if not bentoml.__version__.startswith(SUPPORTED_VERSIONS):
        return _refuse(f"BentoML {bentoml.__version__} is not {SUPPORTED_VERSIONS}")
    try:
        source = inspect.getsource(current) if current is not None else ""
    except (OSError, TypeError):
        source = ""
    if not hasattr(TimeoutMiddleware, "_set_timer_out") or "call_later" not in source:
        return _refuse("TimeoutMiddleware.__call__ is not the timer this patch replaces")
    TimeoutMiddleware.__call__ = _call  # type: ignore[method-assign]
    return True


def _refuse(reason: str) -> bool:
    log.error(
        "NOT patching BentoML's TimeoutMiddleware: %s. Every request may then stay in memory"
        " for traffic.timeout seconds after its response (docs/reliability.md); check"
        " bentowhisper/server/bentoml_patch.py against this BentoML.",
        reason,
    )
    return False
