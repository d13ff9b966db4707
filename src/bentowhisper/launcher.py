"""Start ``bentoml serve service:BentoWhisper`` and wait until it is ready.

``bentowhisper serve`` runs :func:`serve_command` with :func:`serve_env`; tests that start the
CLI use the same functions and :func:`wait_ready`. Stdlib only: nothing here loads the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from .config import ENV_PREFIX, REPO_ROOT

SERVICE = "service:BentoWhisper"
PROBE_TIMEOUT_S = 2.0  # one /readyz probe; a probe that takes longer counts as not ready


def serve_command(port: int = 3000, host: str | None = None) -> list[str]:
    """``python -m bentoml serve service:BentoWhisper`` from this interpreter, run from the
    directory that holds ``service.py`` (the repository, or a Bento's ``src``)."""
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--port", str(port)]
    command += ["--working-dir", str(REPO_ROOT)]
    if host:
        command += ["--host", host]
    return command


def serve_env(
    environ: Mapping[str, str] | None = None,
    *,
    model: str | None = None,
    config: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """``environ`` (default: this process's) with the CLI's choices as ``BENTOWHISPER_*``.

    ``config`` is made absolute: the server runs from the repository, not from the caller's
    directory. Usage tracking is off unless the caller turned it on explicitly.
    """
    env = dict(os.environ if environ is None else environ)
    if model:
        env[ENV_PREFIX + "MODEL"] = model
    if config:
        env[ENV_PREFIX + "CONFIG"] = str(Path(config).resolve())
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> int | None:
    """The status of ``GET url``, or None when nothing answered within ``timeout_s``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, TimeoutError):  # refused, reset, timed out
        return None


def wait_ready(
    base_url: str,
    timeout_s: float = 120.0,
    proc: subprocess.Popen[bytes] | None = None,
    interval_s: float = 0.2,
) -> float:
    """Poll ``base_url/readyz`` until 200; return the seconds it took.

    RuntimeError if ``proc`` (the server) exits first, TimeoutError after ``timeout_s``.
    """
    start = time.monotonic()
    last: int | None = None
    while time.monotonic() - start < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        last = probe(base_url.rstrip("/") + "/readyz")
        if last == 200:
            return time.monotonic() - start
        time.sleep(interval_s)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s (last status: {last})")
