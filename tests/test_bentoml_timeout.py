"""The fix for BentoML's TimeoutMiddleware (``bentowhisper.bentoml_timeout``), in process: a
finished request leaves nothing behind, and a slow one still gets BentoML's 504."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import time
import weakref

import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from bentowhisper.server.bentoml_patch import patch_timeout_middleware

# BentoML keeps the current request in a context variable; this stands in for it.
current_request: contextvars.ContextVar[object] = contextvars.ContextVar("current_request")


class Request:
    """A stand-in for a request and the unread body it holds."""


async def answer(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def dawdle(scope, receive, send) -> None:
    await asyncio.sleep(10)


async def receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


def serve(app, timeout: float) -> tuple[list[dict], weakref.ref, list[asyncio.TimerHandle]]:
    """One request through the middleware, in a task of its own as the server runs it; return
    what was sent, a weak reference to the request and the timers still armed afterwards."""
    middleware = TimeoutMiddleware(app, timeout=timeout)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def handle() -> weakref.ref:
        request = Request()
        current_request.set(request)
        await middleware({"type": "http", "path": "/"}, receive, send)
        return weakref.ref(request)

    async def main() -> tuple[weakref.ref, list[asyncio.TimerHandle]]:
        ref = await asyncio.create_task(handle())
        scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
        return ref, [timer for timer in scheduled if not timer.cancelled()]

    ref, armed = asyncio.run(main())
    return sent, ref, armed


@pytest.fixture(autouse=True)
def patched() -> None:
    patch_timeout_middleware()


def test_a_finished_request_is_released_at_once() -> None:
    sent, ref, armed = serve(answer, timeout=600)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert armed == []  # BentoML's own middleware leaves a 600 s timer here
    gc.collect()
    assert ref() is None, "the request is still referenced after its response"


def test_a_slow_request_still_gets_the_504() -> None:
    sent, _, armed = serve(dawdle, timeout=0.05)
    assert sent[0]["status"] == 504
    assert armed == []


async def fail_before_answering(scope, receive, send) -> None:
    # what BentoML's /readyz does while the model service starts: its dependency probe times out
    raise TimeoutError("dependency not ready")


def test_a_handler_that_fails_before_answering_is_not_held_until_the_timeout() -> None:
    """BentoML's middleware waits for the first response message only: a handler that raised
    before answering kept the request until ``traffic.timeout`` (600 s), which then answered
    nothing ("ASGI callable returned without starting response" in the server log). Now the
    handler's own error reaches the server at once, which answers 500."""
    middleware = TimeoutMiddleware(fail_before_answering, timeout=30)

    async def send(message: dict) -> None:
        raise AssertionError(f"nothing should be sent: {message}")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="dependency not ready"):
        asyncio.run(middleware({"type": "http", "path": "/readyz"}, receive, send))
    assert time.monotonic() - started < 5
