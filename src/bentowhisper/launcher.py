"""Start ``bentoml serve service:BentoWhisper``, wait until it is ready, and stop it cleanly.

``bentowhisper serve`` runs :func:`serve_command` with :func:`serve_env`; the tests and the
benchmarks run servers through :func:`start_server`. Stdlib only: nothing here loads the model.

BentoML's arbiter starts each service worker in a session of its own (``setsid``), and the
workers start FFmpeg, so killing the process group of ``bentoml serve`` is not enough to be sure
that nothing is left behind. :class:`BentoServer` therefore remembers every process it has seen
below the arbiter (pid plus start time, so a reused pid is not mistaken for ours) and, at
:meth:`BentoServer.stop`, signals and checks all of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import ENV_PREFIX, REPO_ROOT

SERVICE = "service:BentoWhisper"
PROBE_TIMEOUT_S = 2.0  # one /readyz probe; a probe that takes longer counts as not ready
READY_TIMEOUT_S = 300.0  # both services load under the load of a shared 2-core CI machine
STOP_GRACE_S = 10.0

# A process identity that survives pid reuse: (pid, start time in clock ticks since boot).
ProcKey = tuple[int, int]


def bentoml_command() -> list[str]:
    """BentoML's CLI from this interpreter (its environment's bentoml, whatever is on PATH)."""
    return [sys.executable, "-m", "bentoml"]


def serve_command(port: int = 3000, host: str | None = None) -> list[str]:
    """``python -m bentoml serve service:BentoWhisper`` from this interpreter, run from the
    directory that holds ``service.py`` (the repository, or a Bento's ``src``)."""
    command = [*bentoml_command(), "serve", SERVICE, "--port", str(port)]
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


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, command line) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    if rest[0] == "Z":  # a zombie is dead; its parent just has not reaped it yet
        return None
    return int(rest[1]), int(rest[19]), cmdline.replace(b"\0", b" ").decode(errors="replace")


def _alive(key: ProcKey) -> str | None:
    """The command line of the process ``key`` if it still runs, else None."""
    info = _stat(key[0])
    return info[2] if info is not None and info[1] == key[1] else None


def descendants(root: int) -> dict[ProcKey, str]:
    """Every live process below ``root`` (not ``root`` itself), with its command line."""
    children: dict[int, list[tuple[int, int, str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                children.setdefault(info[0], []).append((int(entry), info[1], info[2]))
    found: dict[ProcKey, str] = {}
    todo = [root]
    while todo:
        for pid, started, cmdline in children.get(todo.pop(), []):
            if (pid, started) not in found:
                found[(pid, started)] = cmdline
                todo.append(pid)
    return found


@dataclass
class BentoServer:
    """A running ``bentoml serve``; see :func:`start_server`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str]
    seen: dict[ProcKey, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, the server root (BentoML's /readyz, /metrics)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL: ``<url>/v1``."""
        return self.url + "/v1"

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the server's combined stdout and stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"
        return text[-chars:]

    def track(self) -> dict[ProcKey, str]:
        """Remember the processes now running below the server (workers, FFmpeg)."""
        self.seen.update(descendants(self.proc.pid))
        return self.seen

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll ``GET /readyz`` until 200; RuntimeError with the log tail if it never comes."""
        try:
            wait_ready(self.url, timeout_s, self.proc, interval_s=0.5)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; log tail:\n{self.log_tail()}") from None
        self.track()

    def stop(self) -> Shutdown:
        """SIGINT, 10 s grace, SIGINT again, then SIGKILL for the group and every process seen.

        BentoML's workers run in sessions of their own, so the group kill alone would miss them:
        every process ever seen below the server (:meth:`track`) is killed too.
        """
        self.track()
        pgid = self.proc.pid  # start_new_session=True: the arbiter leads its own group
        for grace in (STOP_GRACE_S, 5.0):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(pgid, signal.SIGINT)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.track()
        # Workers exit a moment after the arbiter; give them that moment.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and (
            self.proc.poll() is None or any(map(_alive, self.seen))
        ):
            time.sleep(0.2)
        killed = [f"{self.proc.pid}: bentoml serve (arbiter)"] if self.proc.poll() is None else []
        killed += [f"{key[0]}: {cmd}" for key in self.seen if (cmd := _alive(key))]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        for key in self.seen:
            if _alive(key):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(key[0], signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(map(_alive, self.seen)):
            time.sleep(0.1)
        leftovers = [f"{key[0]}: {cmd}" for key in self.seen if (cmd := _alive(key))]
        with open(self.log_path, "a") as log:
            log.write(f"\n[test harness] stopped; needed SIGKILL: {killed}; left: {leftovers}\n")
        return Shutdown(killed=killed, leftovers=leftovers)


@dataclass(frozen=True)
class Shutdown:
    """How :meth:`BentoServer.stop` went."""

    killed: list[str]  # processes that ignored both SIGINTs and had to be SIGKILLed
    leftovers: list[str]  # processes still running even after SIGKILL

    @property
    def graceful(self) -> bool:
        return not self.killed and not self.leftovers


def start_server(
    *,
    log_dir: Path,
    env: dict[str, str] | None = None,
    port: int | None = None,
    cwd: Path = REPO_ROOT,
) -> BentoServer:
    """Run ``bentoml serve service:BentoWhisper --port PORT`` from ``cwd`` in a new session.

    ``env`` is added to (and overrides) the current environment; ``BENTOML_DO_NOT_TRACK`` is
    always set. Output goes to ``log_dir/bentoml-serve.log``. Returns once the process has been
    started; call :meth:`BentoServer.wait_ready` next.
    """
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "bentoml-serve.log"
    full_env = {**serve_env({**os.environ, **(env or {})}), "BENTOML_DO_NOT_TRACK": "true"}
    command = serve_command(port)
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return BentoServer(proc=proc, port=port, log_path=log_path, env=full_env)
