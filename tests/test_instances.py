"""Two servers on one machine, started with ``bentowhisper serve`` as a user starts them.

From the moment the first is started a probe asks ``/readyz`` every 0.2 s, and keeps asking
while it is stopped with SIGTERM: no probe may wait more than 2 s, the answers go from
"nothing listening" / 503 to 200, and the log says when it is ready. Each server's ``/metrics``
counts only its own requests; each request is logged once, and the internal ``/decode`` calls
only where ``BENTOWHISPER_LOG_DECODE_REQUESTS`` turns them on.

The second runs as in BentoML's images (``BENTOML_CONTAINERIZED``), where a dead worker is not
restarted: its model worker is killed mid-request last, and its health probes must then fail
so that the orchestrator restarts the container. (Outside a container the arbiter restarts the
worker: tests/test_faults.py.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from support import (
    EVAL_DIR,
    BentoServer,
    Outcome,
    assert_envelope,
    audio_leftovers,
    decodes,
    free_port,
    longform_mp3,
    metric,
    model_workers,
    post_audio,
    wait_for,
)

from bentowhisper.launcher import probe, wait_ready

JFK = EVAL_DIR / "audio/en_misc/jfk.flac"
MODEL = "tiny.en"
PROBE_EVERY_S = 0.2
PROBE_LIMIT_S = 2.0
STOP_GRACE_S = 30.0  # BentoML's own graceful shutdown, with probes and a request in flight


@dataclass
class Prober:
    """``GET /readyz`` every 0.2 s from a thread: (seconds since start, status, seconds taken);
    status None means nothing answered (refused, or no answer within 10 s)."""

    url: str
    started: float = field(default_factory=time.monotonic)
    probes: list[tuple[float, int | None, float]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            sent = time.monotonic()
            status = probe(self.url + "/readyz", timeout_s=10.0)
            self.probes.append((sent - self.started, status, time.monotonic() - sent))
            self.done.wait(max(0.0, PROBE_EVERY_S - (time.monotonic() - sent)))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=15)


def start(tmp: Path, env: dict[str, str]) -> BentoServer:
    port = free_port()
    log_path = tmp / "serve.log"
    full_env = {**os.environ, **env, "BENTOML_HOME": str(tmp / "bentoml-home")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentowhisper.cli", "serve", "--model", MODEL, "--port",
             str(port)],
            cwd=tmp,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return BentoServer(proc=proc, port=port, log_path=log_path, env=full_env)


@pytest.fixture(scope="module")
def servers(converted_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """(first, its prober, second): the second logs its decode calls, and runs as in a
    container with a ``TMPDIR`` of its own (see :func:`support.audio_leftovers`)."""
    env = {
        "BENTOWHISPER_MODELS_DIR": str(converted_models_dir),
        "BENTOWHISPER_DIARIZATION": "false",
    }
    first = start(tmp_path_factory.mktemp("first"), env)
    prober = Prober(first.url)
    # a short temp path: BentoML puts the services' Unix sockets there (108-byte limit)
    tmp = tmp_path_factory.mktemp("second")
    (tmp / "tmp").mkdir()
    second = start(
        tmp,
        {
            **env,
            "BENTOWHISPER_LOG_DECODE_REQUESTS": "true",
            "BENTOML_CONTAINERIZED": "true",
            "TMPDIR": str(tmp / "tmp"),
        },
    )
    try:
        for server in (first, second):
            try:
                wait_ready(server.url, timeout_s=400, proc=server.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n{server.log_tail()}") from exc
            server.track()
        yield first, prober, second
    finally:
        prober.stop()
        for server in (first, second):
            server.stop()


def transcribe(server: BentoServer) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    with open(JFK, "rb") as audio:
        return client.audio.transcriptions.create(model="whisper-1", file=audio).text


def requests_total(server: BentoServer) -> float:
    return metric(
        server.url, "bentowhisper_requests_total", endpoint="transcriptions", status="200"
    )


def test_ready_fast_and_announced(servers) -> None:
    first, prober, _ = servers
    time.sleep(1.0)  # a few probes after the first 200
    probes = list(prober.probes)
    statuses = [status for _, status, _ in probes]
    assert 200 in statuses and statuses[-1] == 200, probes[-5:]
    slowest = max(took for _, _, took in probes)
    assert slowest <= PROBE_LIMIT_S, [p for p in probes if p[2] > PROBE_LIMIT_S]
    before = statuses[: statuses.index(200)]
    assert set(before) <= {None, 503}, sorted(set(before), key=str)
    ready = re.search(
        rf"ready on http://localhost:{first.port} \(model {re.escape(MODEL)}, device cpu, "
        r"dtype torch\.(bfloat16|float32)\)",
        first.log_tail(200_000),
    )
    assert ready, first.log_tail()


def test_each_instance_counts_its_own_requests(servers) -> None:
    first, _, second = servers
    before = requests_total(first), requests_total(second)
    assert "ask not what your country" in transcribe(first)
    for _ in range(2):
        transcribe(second)
    assert (requests_total(first), requests_total(second)) == (before[0] + 1, before[1] + 2)


def test_one_log_line_per_request(servers) -> None:
    first, _, second = servers
    transcribe(first)
    transcribe(second)
    time.sleep(0.5)
    line = re.compile(
        r"request (\w+) POST /v1/audio/transcriptions status=200 audio=11\.00s time=\d+\.\d{3}s"
    )
    for server in (first, second):
        log = server.log_tail(500_000)
        ids = line.findall(log)
        assert ids and len(ids) == len(set(ids)), log[-3000:]
        assert "path=/v1/audio/transcriptions" not in log  # BentoML's own access line is off
    assert "path=/decode" not in first.log_tail(500_000)
    assert "path=/decode" in second.log_tail(500_000)


def test_sigterm_stops_cleanly_with_probes_in_flight(servers) -> None:
    first, prober, _ = servers
    first.track()
    sent = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    first.proc.wait(timeout=STOP_GRACE_S)
    assert time.monotonic() - sent < STOP_GRACE_S
    shutdown = first.stop()  # left-over workers
    assert shutdown.graceful, shutdown
    assert max(took for _, _, took in prober.probes) <= PROBE_LIMIT_S


def test_model_worker_killed_in_a_container_fails_the_probes(servers) -> None:
    """In-flight requests get no answer here (the decode call waits on the service socket,
    where no worker accepts any more) until the client gives up: accepted below as a client
    timeout as well as a 5xx envelope."""
    _, _, server = servers
    url = server.url
    (victim,) = model_workers(server)
    server.track()
    audio = longform_mp3(45)
    before = decodes(url)
    outcomes: list[Outcome] = []
    requests = [
        threading.Thread(target=lambda: outcomes.append(post_audio(url, audio, 20)))
        for _ in range(2)
    ]
    for thread in requests:
        thread.start()
    assert wait_for(lambda: decodes(url) >= before + 1, timeout_s=60), "no decoding"
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    failed: dict[str, float] = {}
    while time.monotonic() - killed_at < 45 and len(failed) < 2:
        for path in ("/readyz", "/livez"):
            if path not in failed and probe(url + path, timeout_s=PROBE_LIMIT_S) != 200:
                failed[path] = time.monotonic() - killed_at
        time.sleep(0.5)
    for thread in requests:
        thread.join(timeout=60)
    respawned = model_workers(server)
    print(
        f"\n[container kill] probes failed after: "
        f"{ {path: round(s, 1) for path, s in failed.items()} }; in-flight requests: "
        f"{[(o.status, round(o.seconds, 1)) for o in outcomes]}; respawned: {respawned}"
    )

    assert not respawned, "restarted in a container?"
    assert set(failed) == {"/readyz", "/livez"}, failed
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert outcome.status != 200, outcome
        if isinstance(outcome.status, int):
            assert 500 <= outcome.status < 600, outcome
            assert_envelope(outcome)
        else:
            assert outcome.status == "ReadTimeout", outcome
    shutdown = server.stop()
    assert not shutdown.leftovers, shutdown
    assert not audio_leftovers(server)


@pytest.mark.parametrize(
    ("owner_is_parent", "worker", "keeps"),
    [(True, True, True), (True, False, False), (False, True, False)],
    ids=["bentoml-worker-of-its-server", "server-started-by-the-owner", "stranger"],
)
def test_only_a_servers_workers_take_its_metrics_dir(
    owner_is_parent: bool, worker: bool, keeps: bool, tmp_path: Path, monkeypatch
) -> None:
    """The rule behind separate counters: a process that inherited a directory that another
    made for itself (``PROMETHEUS_MULTIPROC_DIR`` with its owner's pid) reuses it only when it
    is that process's BentoML worker. A ``bentoml serve`` started by a test run that had
    imported ``service.py`` used to take the test run's, and its API answered 503 "starting"
    beside the real worker."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    from bentowhisper.server import instance

    monkeypatch.setenv(instance.METRICS_ENV, str(tmp_path))
    monkeypatch.setenv(instance.OWNER_ENV, str(os.getppid() if owner_is_parent else 1))
    argv = [sys.executable, "-m", instance.WORKER_MODULE] if worker else ["bentoml", "serve"]
    monkeypatch.setattr(sys, "orig_argv", argv)
    before = BentoMLContainer.prometheus_multiproc_dir.get()
    try:
        directory = instance.own_metrics_dir()
    finally:
        BentoMLContainer.prometheus_multiproc_dir.set(before)
    assert (directory == str(tmp_path)) is keeps
    if not keeps:  # a directory of its own, named where its workers will look
        assert os.environ[instance.METRICS_ENV] == directory
        assert os.environ[instance.OWNER_ENV] == str(os.getpid())
