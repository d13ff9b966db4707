"""``/readyz`` that never hangs, and a log line when the service is ready.

BentoML's own ``/readyz`` in the API service asks the model service's ``/readyz`` with a 5 s
timeout per probe, and a probe sent while the model service starts waits on it (a probe with a
shorter timeout sees no answer at all). Here the API service answers ``/readyz`` itself, from
what a background watcher last learned: 503 at once until the model service has answered
``check`` (it answers only once its model is loaded and warmed up, so it can decode), then 200.
The watcher logs ``ready on http://HOST:PORT (model ..., device ..., dtype ...)`` once, and
keeps checking, so a model service that stops answering (``FAILURES_TO_UNREADY`` checks in a
row) turns the probe back to 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("bentowhisper.readiness")

CHECK_TIMEOUT_S = 2.0  # one check of the model service
INTERVAL_S = 0.25  # between checks while starting
RECHECK_S = 5.0  # between checks once ready
# Failed checks in a row that turn a ready service to 503. One is not enough: a pooled
# keep-alive connection that the model service has closed fails once with "Broken pipe", and
# the next check, on a new connection, succeeds.
FAILURES_TO_UNREADY = 2

# What the model service reports: {"model": ..., "device": ..., "dtype": ...}.
CheckFn = Callable[[], Awaitable[Mapping[str, str]]]


class Watcher:
    """The API worker's view of readiness, kept current by :meth:`run`."""

    def __init__(self) -> None:
        self.ready = False
        self.announced = False
        self.task: asyncio.Task[None] | None = None

    def start(self, check: CheckFn, url: str) -> None:
        """Begin watching on the running loop (from the service's startup hook)."""
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.run(check, url))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.ready = False

    async def run(self, check: CheckFn, url: str) -> None:
        started = time.monotonic()
        failures = 0
        while True:
            try:
                info = await asyncio.wait_for(check(), timeout=CHECK_TIMEOUT_S)
            except Exception as exc:  # starting, gone, or slow: not ready, whatever the cause
                failures += 1
                if self.ready and failures >= FAILURES_TO_UNREADY:
                    logger.warning("not ready: the model service does not answer (%r)", exc)
                    self.ready = False
            else:
                failures = 0
                self.ready = True
                if not self.announced:
                    self.announced = True
                    details = ", ".join(f"{key} {value}" for key, value in info.items())
                    logger.info(
                        "ready on %s (%s) %.1f s after the API worker started",
                        url,
                        details,
                        time.monotonic() - started,
                    )
            await asyncio.sleep(RECHECK_S if self.ready and not failures else INTERVAL_S)


WATCHER = Watcher()


class ReadyProbe:
    """ASGI middleware for the BentoML service: ``GET /readyz`` answered from :data:`WATCHER`
    without waiting on anything."""

    def __init__(self, app: ASGIApp, path: str = "/readyz") -> None:
        self.app, self.path = app, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            if WATCHER.ready:
                response = PlainTextResponse("ready\n")
            else:
                response = PlainTextResponse(
                    "starting\n", status_code=503, headers={"Retry-After": "1"}
                )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def listening_url() -> str:
    """``http://HOST:PORT`` of this worker's socket, a wildcard address shown as ``localhost``.

    BentoML's arbiter binds the socket and hands it to the worker as ``--fd N``; the worker's
    own copy of the settings still holds the default port, so the socket is asked instead.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    host, port = BentoMLContainer.http.host.get(), BentoMLContainer.http.port.get()
    if "--fd" in sys.argv[:-1]:
        fd = int(sys.argv[sys.argv.index("--fd") + 1])
        with socket.socket(fileno=os.dup(fd)) as listening:
            host, port = listening.getsockname()[:2]
    shown = "localhost" if host in ("", "0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


# What the ``bentoml serve`` process answers on the API's socket until an API worker serves it.
STARTING_BODY = json.dumps(
    {
        "error": {
            "message": "The service is starting; retry in a moment.",
            "type": "server_error",
            "param": None,
            "code": "starting",
        }
    }
).encode()
STARTING_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(STARTING_BODY)).encode()
    + b"\r\n\r\n"
    + STARTING_BODY
)


def started_marker() -> Path:
    """The file the first API worker creates once it serves (in the metrics directory, which
    the ``bentoml serve`` process and its workers share, and which is emptied at each start)."""
    return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]) / "bentowhisper-api-started"


def answer_while_starting() -> None:
    """In the ``bentoml serve`` process: once it has bound the API's socket, answer every
    connection on it with 503 at once until an API worker has started.

    The arbiter binds the socket long before a worker accepts on it (the worker imports the
    service, then starts it), and a connection made meanwhile waits in the listen queue: a
    probe sent then would hang for as long as the worker takes to start.
    """
    from _bentoml_impl.server.serving import API_SERVER_NAME
    from circus.sockets import CircusSocket

    bind_and_listen = CircusSocket.bind_and_listen

    def bind_listen_and_answer(sock: CircusSocket) -> None:
        bind_and_listen(sock)
        if sock.name == API_SERVER_NAME:
            threading.Thread(
                target=_answer_until_started, args=(sock, started_marker()), daemon=True
            ).start()

    CircusSocket.bind_and_listen = bind_listen_and_answer


def _answer_until_started(sock: socket.socket, marker: Path) -> None:
    # Non-blocking, so a connection a worker accepted first does not leave accept() waiting
    # (the workers' asyncio loops set the shared socket non-blocking anyway).
    sock.setblocking(False)
    while not marker.exists():
        try:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if not readable:
                continue
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            continue
        except (OSError, ValueError):  # the socket was closed: the server is stopping
            return
        with conn:
            try:
                conn.settimeout(1.0)
                conn.recv(65536)  # the request head; the answer is the same for every request
                conn.sendall(STARTING_RESPONSE)
            except OSError:
                pass
