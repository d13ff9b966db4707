"""What the tests share: where the eval set is, media made with FFmpeg, raw HTTP, metrics, and
a ``bentoml serve service:BentoWhisper`` started and stopped the way a user does.

Test modules import this module (``tests`` is on pytest's ``pythonpath``), never each other.

BentoML's arbiter starts each service worker in a session of its own (``setsid``), and the
workers start FFmpeg, so killing the process group of ``bentoml serve`` is not enough to be sure
that nothing is left behind. :class:`BentoServer` therefore remembers every process it has seen
below the arbiter (pid plus start time, so a reused pid is not mistaken for ours) and, at
:meth:`BentoServer.stop`, signals and checks all of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

try:  # openai >= 3 talks through the httpx2 fork; any httpx-like client does for probes
    import httpx
except ImportError:  # pragma: no cover - depends on the installed packages
    import httpx2 as httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared eval set sits beside the repository (``<clone>/../shared/eval``), wherever the
# repository is cloned; BENTOWHISPER_EVAL_DIR points elsewhere when set.
EVAL_DIR = Path(os.environ.get("BENTOWHISPER_EVAL_DIR") or REPO_ROOT.parent / "shared" / "eval")
ERROR_KEYS = {"message", "type", "param", "code"}  # OpenAI's error envelope, all four always
READY_TIMEOUT_S = 300.0  # both services load under the load of a shared 2-core CI machine
PROBE_TIMEOUT_S = 2.0  # BentoML's /readyz can hang while the services start: never wait long
STOP_GRACE_S = 10.0

# A process identity that survives pid reuse: (pid, start time in clock ticks since boot).
ProcKey = tuple[int, int]


# jfk.flac re-encoded into each container users send: name -> (file name, FFmpeg options).
ENCODINGS: dict[str, tuple[str, list[str]]] = {
    "wav": ("jfk.wav", ["-c:a", "pcm_s16le"]),
    "flac": ("jfk.flac", ["-c:a", "flac"]),
    "mp3": ("jfk.mp3", ["-c:a", "libmp3lame", "-b:a", "128k"]),
    "m4a_faststart": ("jfk_fast.m4a", ["-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart"]),
    "m4a_moov_at_end": ("jfk_end.m4a", ["-c:a", "aac", "-b:a", "128k"]),
    "mp4": ("jfk.mp4", ["-c:a", "aac", "-b:a", "128k", "-f", "mp4"]),
    "mpeg": ("jfk.mpeg", ["-c:a", "mp2", "-b:a", "192k", "-f", "mpeg"]),
    "ogg": ("jfk.ogg", ["-c:a", "libvorbis", "-q:a", "5"]),
    "opus": ("jfk.opus", ["-c:a", "libopus", "-b:a", "64k", "-f", "opus"]),
    "webm": ("jfk.webm", ["-c:a", "libopus", "-b:a", "64k", "-f", "webm"]),
    "aiff": ("jfk.aiff", ["-c:a", "pcm_s16be", "-f", "aiff"]),
}

Part = tuple[str, bytes | str, str | None, str | None]  # name, value, filename, content type


def reference(clip_id: str) -> str:
    """The human reference transcript of ``clip_id`` from the eval manifest."""
    with open(EVAL_DIR / "manifest.jsonl", encoding="utf-8") as manifest:
        for line in manifest:
            entry = json.loads(line)
            if entry["id"] == clip_id:
                return entry["text"]
    raise KeyError(clip_id)


def ffmpeg(*args: str, out_name: str = "out") -> bytes:
    """Run FFmpeg (the binary the server finds) with ``args`` (all but the output) and return
    what it wrote.

    The output is a real file, not a pipe: the mp4 muxers need to seek back for their index;
    ``out_name``'s extension picks the container where ``args`` name none (``-f``).
    """
    from bentowhisper.server.audio import find_ffmpeg

    cmd = [find_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error"]
    with tempfile.TemporaryDirectory(prefix="media-") as tmp:
        out = Path(tmp) / out_name
        done = subprocess.run([*cmd, *args, "-y", str(out)], capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return out.read_bytes()


def multipart(parts: Iterable[Part], boundary: str = "corpus-boundary-7d1f") -> tuple[bytes, str]:
    """A multipart/form-data body written by hand, so that every byte is the test's choice;
    returns it and its Content-Type."""
    out = io.BytesIO()
    for name, value, filename, content_type in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(disposition.encode() + b"\r\n")
        if content_type is not None:
            out.write(f"Content-Type: {content_type}\r\n".encode())
        out.write(b"\r\n")
        out.write(value.encode() if isinstance(value, str) else value)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def http_request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """An HTTP/1.1 request as bytes, for a raw socket."""
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples on ``url``/metrics whose labels include
    ``labels``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{key}="{wanted}"' in head for key, wanted in labels.items()):
            total += float(value)
    return total


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bentoml_command() -> list[str]:
    """``python -m bentoml`` from this interpreter, else the ``bentoml`` script beside it."""
    probe = subprocess.run(
        [sys.executable, "-m", "bentoml", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"},
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "bentoml"]
    script = Path(sys.executable).with_name("bentoml")
    if script.exists():
        return [str(script)]
    found = shutil.which("bentoml")
    if found:
        return [found]
    raise RuntimeError(f"cannot run bentoml: {probe.stderr.strip()[-500:]}")


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
        deadline = time.monotonic() + timeout_s
        last = "no probe yet"
        with httpx.Client(timeout=PROBE_TIMEOUT_S) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"bentoml serve exited with {self.proc.returncode} before it was ready;"
                        f" log tail:\n{self.log_tail()}"
                    )
                try:
                    response = client.get(self.url + "/readyz")
                    last = f"HTTP {response.status_code}"
                    if response.status_code == 200:
                        self.track()
                        return
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.5)
        raise RuntimeError(
            f"bentoml serve not ready after {timeout_s:.0f} s (last probe: {last}); "
            f"log tail:\n{self.log_tail()}"
        )

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
    log_path = log_dir / "bentoml-serve.log"
    full_env = {**os.environ, **(env or {}), "BENTOML_DO_NOT_TRACK": "true"}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    command = [*bentoml_command(), "serve", "service:BentoWhisper", "--port", str(port)]
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
