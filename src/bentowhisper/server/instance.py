"""What keeps one running server to itself: its Prometheus directory and its log lines.

BentoML keeps multiprocess metrics in ``$BENTOML_HOME/prometheus_multiproc_dir`` and empties it
when a server starts, so two servers on one machine report each other's counters (and the
second wipes the first's). :func:`own_metrics_dir` gives each ``bentoml serve`` a directory of
its own. BentoML's server logging shows only warnings from loggers other than its own;
:func:`configure_logging` lets the service's INFO lines (readiness, one line per request) out.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The pid of the process that made the directory: its workers keep it; any other process that
# inherited the variable (a test run that imported service.py, then started servers) does not.
OWNER_ENV = "PROMETHEUS_MULTIPROC_DIR_OWNER"  # not BENTOWHISPER_*: those are settings
WORKER_MODULE = "_bentoml_impl.worker.service"  # what BentoML's arbiter runs as each worker
logger = logging.getLogger("bentowhisper")


def own_metrics_dir() -> str:
    """Point BentoML's multiprocess metrics at this server's own directory; return it.

    Call where ``service.py`` is imported: first in the ``bentoml serve`` process (before it
    creates the directory and passes it to its workers as ``PROMETHEUS_MULTIPROC_DIR``), then in
    each worker, whose parent made it. A directory the user set is used as is; one made here
    is removed when the process that made it exits.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    directory = os.environ.get(METRICS_ENV)
    owner = os.environ.get(OWNER_ENV)
    # A `bentoml serve` started by a process that made a directory for itself is that process's
    # child as well, but no worker: it must not take its parent's directory (its workers would
    # then not find theirs, and the API's started marker would never be seen).
    inherited = owner is not None and (owner != str(os.getppid()) or not _is_bentoml_worker())
    if not directory or inherited:
        directory = tempfile.mkdtemp(prefix="bentowhisper-metrics-")
        os.environ[METRICS_ENV], os.environ[OWNER_ENV] = directory, str(os.getpid())
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    BentoMLContainer.prometheus_multiproc_dir.set(directory)
    return directory


def _is_bentoml_worker() -> bool:
    return WORKER_MODULE in sys.orig_argv


def configure_logging() -> None:
    """INFO for the ``bentowhisper`` loggers, through BentoML's handler (root's level stays)."""
    logger.setLevel(logging.INFO)


LOG_KEY = "bentowhisper.request"  # the scope entry where a handler notes the audio length
UNLOGGED = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})  # probes, every second


def note_audio(scope: Scope, seconds: float) -> None:
    """Record the request's audio length for its log line (see :class:`RequestLog`)."""
    if LOG_KEY in scope:
        scope[LOG_KEY]["audio_seconds"] = seconds


class RequestLog:
    """ASGI middleware for the BentoML service: one line per request once it has been answered
    (a stream: once it ended), with its id (the client's ``X-Request-ID``, else a new one, sent
    back in the response), status, audio seconds and time. Probes are not logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLOGGED:
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        entry: dict = {"id": given[:64] or uuid.uuid4().hex[:16], "status": None}
        scope[LOG_KEY] = entry
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", entry["id"].encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            audio = entry.get("audio_seconds")
            logger.info(
                "request %s %s %s status=%s audio=%s time=%.3fs",
                entry["id"],
                scope["method"],
                scope["path"],
                entry["status"] if entry["status"] is not None else "none (client gone)",
                f"{audio:.2f}s" if audio is not None else "-",
                time.monotonic() - started,
            )
