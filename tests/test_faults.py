"""Faults: a client that leaves, a model worker that dies, a batch item that fails.

The server tests run on the suite's ``tiny_server`` (conftest.py: ``bentoml serve`` with
``tiny.en``, cheap to decode on a CPU). It has a temp directory of its own (``TMPDIR``) so that
the audio decoder's ``bentowhisper-audio-*`` directories can be checked for leftovers, and
every process below it is tracked so that none may outlive it:

* a client that disconnects mid-transcription stops the decoding at the next window
  (BentoML's ``bentoml_service_request_total`` for the model service's ``/decode`` stops
  rising, and the API counts the request as 499);
* SIGKILL of the model worker mid-request: outside a container BentoML's arbiter restarts it
  and the service recovers (in a container, tests/test_instances.py);
* one failing item of a batch does not fail the others (in-process, ``decode_batch``);
* through the app in-process (its counters exposed on ``/metrics`` as the service does): the
  request time limit, a failing item, a bug and an unavailable model service.

Every fault that a request can meet is tried with ``stream=true`` as well: the stream must end
with OpenAI's error event where a plain request gets the error status, and the request counter
must record the status the client met either way.

Figures (stop latency, recovery time, ...) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from support import (
    EVAL_DIR,
    LONGFORM,
    TRANSCRIBE,
    Outcome,
    assert_envelope,
    decodes,
    http_request,
    longform_mp3,
    metric,
    model_workers,
    multipart,
    outcome_of,
    post_audio,
    wait_for,
)

from bentowhisper.config import Settings, load_settings
from bentowhisper.launcher import probe

JFK = EVAL_DIR / "audio/en_misc/jfk.flac"
LJ = EVAL_DIR / "audio/en_ljspeech/LJ001-0001.wav"
PROBE_S = 2.0

pytestmark = pytest.mark.skipif(
    not (EVAL_DIR / LONGFORM).exists(), reason=f"eval set not found at {EVAL_DIR}"
)


# --------------------------------------------------------------------------------------------
# Helpers


def requests_by_status(url: str) -> dict[str, float]:
    """``bentowhisper_requests_total`` of the transcriptions endpoint, by status."""
    return {
        status: metric(url, "bentowhisper_requests_total", endpoint="transcriptions", status=status)
        for status in ("200", "499", "500", "503", "504")
    }


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def long_audio() -> dict[str, bytes]:
    """The longform eval clip looped to 5 min, and its first 45 s, as 32 kbit/s MP3."""
    return {"5min": longform_mp3(300), "45s": longform_mp3(45)}


# --------------------------------------------------------------------------------------------
# (a) The client leaves


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_client_disconnect_stops_decoding(tiny_server, long_audio, stream):
    url = tiny_server.url
    parts = [
        ("file", long_audio["5min"], "long.mp3", "audio/mpeg"),
        ("model", "whisper-1", None, None),
    ]
    if stream:
        parts.append(("stream", "true", None, None))
    body, content_type = multipart(parts)
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
    before = decodes(url)
    closed_before = metric(url, "bentowhisper_requests_total", status="499")

    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=10) as sock:
        sock.sendall(http_request("POST", TRANSCRIBE, headers, body))
        started = wait_for(lambda: decodes(url) >= before + 2, timeout_s=60)
        assert started, f"decoding never started: {decodes(url) - before} windows"
    closed_at = time.monotonic()  # the socket is closed: the client is gone
    at_close = decodes(url) - before

    changes: list[tuple[float, float]] = []  # (seconds after the close, windows so far)
    last = at_close
    while time.monotonic() - closed_at < 12:
        now = decodes(url) - before
        if now != last:
            changes.append((time.monotonic() - closed_at, now))
            last = now
        time.sleep(0.1)
    stop_latency = changes[-1][0] if changes else 0.0
    print(
        f"\n[disconnect, {'stream' if stream else 'plain'}] windows decoded before the close:"
        f" {at_close:.0f}, after: "
        f"{last - at_close:.0f}; decoding stopped {stop_latency:.2f} s after the close "
        "(the 5 min file needs >= 10)"
    )

    # At most the decode calls in flight at the close finish (one per chunk in flight, the
    # default chunking being VAD chunks decoded in parallel); nothing is started after them.
    in_flight = load_settings(tiny_server.env).max_chunks_in_flight  # what the server runs
    assert last - at_close <= in_flight, changes
    assert stop_latency < 10.0, changes
    assert metric(url, "bentoml_service_request_in_progress", endpoint="/decode") == 0
    assert wait_for(
        lambda: metric(url, "bentowhisper_requests_total", status="499") == closed_before + 1, 5
    ), "the request was not counted as closed by the client (499)"
    assert probe(url + "/readyz", timeout_s=PROBE_S) == 200


# --------------------------------------------------------------------------------------------
# (b) The model worker dies


def test_model_worker_killed_mid_request_is_restarted(tiny_server, long_audio):
    """Outside a container the arbiter restarts the worker. In-flight requests then either
    complete (the API retries a decode once on a dropped connection, and the retry waits on
    the service socket for the new worker) or fail with a 5xx envelope; none may hang."""
    url = tiny_server.url
    tiny_server.track()
    (victim,) = model_workers(tiny_server)
    before = decodes(url)

    counted = requests_by_status(url)
    streams = [False, True]
    # The retry of a dropped decode call waits on the socket for the restarted worker, which
    # loads its model first: allow for that.
    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        futures = [
            pool.submit(post_audio, url, long_audio["45s"], 300.0, stream=stream)
            for stream in streams
        ]
        assert wait_for(lambda: decodes(url) >= before + 1, timeout_s=60), "no decoding"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_for(lambda: bool(set(model_workers(tiny_server)) - {victim}), 30), (
            "the model worker was not restarted"
        )
        restarted_s = time.monotonic() - killed_at
        tiny_server.track()  # the new worker too, for the shutdown check
        outcomes = [future.result() for future in futures]
    finished_s = time.monotonic() - killed_at

    print(
        f"\n[worker kill] new model worker after {restarted_s:.1f} s; in-flight requests: "
        f"{[o.status for o in outcomes]} within {finished_s:.1f} s of the kill"
    )
    for outcome in outcomes:
        assert outcome.status == 200 or (
            isinstance(outcome.status, int) and 500 <= outcome.status < 600
        ), outcome
        if outcome.status == 200 and not outcome.failed_in_band:
            assert "printing" in outcome.body["text"].lower(), outcome
        else:
            assert_envelope(outcome)
            assert outcome.body["error"]["type"] == "server_error", outcome
    # Counted with the status each client met: a stream that failed after its 200 as a 5xx.
    after = requests_by_status(url)
    delta = {status: after[status] - counted[status] for status in after}
    succeeded = sum(o.status == 200 and not o.failed_in_band for o in outcomes)
    assert delta["200"] == succeeded, (delta, outcomes)
    assert delta["500"] + delta["503"] + delta["504"] == len(outcomes) - succeeded, delta

    # Recovered: healthy, and a new request succeeds.
    assert wait_for(lambda: probe(url + "/readyz", timeout_s=PROBE_S) == 200, 60)
    after = post_audio(url, JFK.read_bytes(), 60.0)
    assert after.status == 200, after
    assert "ask not what your country" in after.body["text"].lower(), after


# --------------------------------------------------------------------------------------------
# (c) One bad item in a batch


def test_a_failing_batch_item_does_not_fail_the_others(converted_models_dir):
    from bentowhisper.engine.decoding import decode_batch
    from bentowhisper.engine.loading import load_whisper
    from bentowhisper.server.audio import decode_audio
    from bentowhisper.server.features import LogMel
    from bentowhisper.server.longform import WINDOW_SAMPLES
    from bentowhisper.wire import DecodeJob

    bundle = load_whisper(str(converted_models_dir / "tiny.en"), device="cpu", dtype="float32")
    features = LogMel.from_checkpoint(bundle.checkpoint)

    def window(path: Path) -> DecodeJob:
        samples = decode_audio(path)[:WINDOW_SAMPLES]
        padded = np.pad(samples, (0, WINDOW_SAMPLES - len(samples)))
        return DecodeJob.for_window(features(padded), language="en")

    good = [window(JFK), window(LJ)]
    truncated = DecodeJob(features=good[0].features[:-4], language="en")
    wrong_mels = DecodeJob.for_window(np.zeros((128, 3000), np.float32), language="en")

    alone = [decode_batch(bundle, [job])[0] for job in good]
    mixed = decode_batch(bundle, [truncated, good[0], wrong_mels, good[1]])

    assert len(mixed) == 4
    assert mixed[0].error and mixed[2].error, mixed
    assert mixed[0].tokens == [] and mixed[2].tokens == []
    for result, reference in zip([mixed[1], mixed[3]], alone, strict=True):
        assert result.error is None, result
        assert result.tokens == reference.tokens
        assert result.avg_logprob == pytest.approx(reference.avg_logprob, abs=1e-5)
        assert result.no_speech_prob == pytest.approx(reference.no_speech_prob, abs=1e-5)
    text = bundle.vocab.decode([t for t in mixed[1].tokens if t < bundle.vocab.eot])
    assert "ask not what your country" in text.lower(), text


# --------------------------------------------------------------------------------------------
# Through the app in-process: the time limit, a failing item, a bug, an unavailable model


@pytest.fixture(scope="module")
def tiny_vocab(converted_models_dir):
    from bentowhisper.vocabulary import load_vocabulary

    return load_vocabulary(str(converted_models_dir / "tiny.en"))


def in_process(vocab, decode, request_timeout_s: float = 600.0):
    """The app with ``decode`` as its model service and the process's counters on /metrics."""
    from prometheus_client import make_asgi_app
    from starlette.testclient import TestClient

    from bentowhisper.server.app import create_app
    from bentowhisper.server.serving import Admission, Backend

    app = create_app()
    app.mount("/metrics", make_asgi_app())
    app.state.backend = Backend(
        settings=Settings(model="tiny.en", request_timeout_s=request_timeout_s),
        vocab=vocab,
        features=lambda window: np.zeros((80, 3000), np.float32),
        decode=decode,
        admission=Admission(4),
    )
    return TestClient(app, raise_server_exceptions=False)


def post_jfk(client, stream: bool) -> Outcome:
    started = time.monotonic()
    response = client.post(
        TRANSCRIBE,
        files={"file": ("jfk.flac", JFK.read_bytes(), "audio/flac")},
        data={"model": "tiny.en", **({"stream": "true"} if stream else {})},
    )
    outcome = outcome_of(response, started, stream)
    outcome.headers = response.headers
    return outcome


def counted(client, status: int) -> float:
    text = client.get("/metrics/").text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("bentowhisper_requests_total{") and f'status="{status}"' in line
    )


def assert_failed(outcome: Outcome, stream: bool, status: int) -> dict:
    """The client-visible failure: the status, or for a stream a 200 whose last event is the
    error (after no transcript); OpenAI's envelope either way."""
    assert outcome.status == (200 if stream else status), outcome
    assert_envelope(outcome)
    if stream:
        assert outcome.failed_in_band and outcome.events[-1] is outcome.body, outcome
        assert not any(event.get("type") == "transcript.text.done" for event in outcome.events)
    return outcome.body["error"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_request_over_the_time_limit_is_stopped_with_a_504(tiny_vocab, stream):
    """BentoML's own 504 at ``traffic.timeout`` has a body that is not OpenAI's envelope: the
    app answers one second before it, in the envelope (a stream: its error event), and cancels
    the decoding."""
    calls: list[str] = []

    async def never(jobs):
        calls.append("started")
        try:
            await asyncio.sleep(10)  # without the time limit: a 503 after 10 s
        except asyncio.CancelledError:
            calls.append("cancelled")
            raise

    with in_process(tiny_vocab, never, request_timeout_s=2.5) as client:
        before = counted(client, 504)
        outcome = post_jfk(client, stream)
        error = assert_failed(outcome, stream, 504)
        assert counted(client, 504) == before + 1

    assert error["type"] == "server_error" and "time limit" in error["message"], error
    assert 1.0 <= outcome.seconds < 2.5, outcome.seconds  # before BentoML's own 504 at 2.5 s
    assert calls == ["started", "cancelled"], calls


FAULTS = {
    # a window the model service failed on: a bug, never worth a retry
    "failed item": (500, lambda jobs: [failed(job) for job in jobs]),
    # an exception in the call that is not a transport failure: a bug too
    "bug": (500, ValueError("secret detail: a bug")),
    # the model service shed the window, could not be reached or did not answer in time
    "unavailable": (503, "unavailable"),
}


def failed(job):
    from bentowhisper.wire import DecodeResult

    return DecodeResult(
        tokens=[],
        avg_logprob=0.0,
        no_speech_prob=0.0,
        language="en",
        language_probability=0.0,
        temperature=job.temperature,
        error="RuntimeError: secret detail of the model service",
    )


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_model_failures_are_mapped_once(tiny_vocab, caplog, fault, stream):
    """A failed item or a bug is a 500 ``server_error`` whose message names a request id that
    the log has too, never the exception's text; only an unavailable model service is a 503
    with Retry-After. A stream reports the same error as its last event."""
    from bentowhisper.server.serving import ModelUnavailable

    status, cause = FAULTS[fault]

    async def decode(jobs):
        if cause == "unavailable":
            raise ModelUnavailable("ClientConnectorError: connection refused")
        if isinstance(cause, Exception):
            raise cause
        return cause(jobs)

    with in_process(tiny_vocab, decode) as client:
        before = counted(client, status)
        outcome = post_jfk(client, stream)
        error = assert_failed(outcome, stream, status)
        assert counted(client, status) == before + 1

    assert error["type"] == "server_error", error
    assert "secret detail" not in error["message"], error
    if status == 503:
        assert "retry" in error["message"].lower(), error
        if not stream:
            assert outcome.headers["retry-after"] == "5"
        return
    request_id = re.search(r"req_[0-9a-f]+", error["message"])
    assert request_id, error
    logged = [r for r in caplog.records if request_id.group() in r.getMessage()]
    assert logged and logged[0].levelname == "ERROR" and logged[0].exc_info, caplog.text


def test_a_stream_cancelled_with_its_response_stops_cleanly(tiny_vocab):
    """Starlette cancels a stream whose client left through an anyio cancel scope, which
    cancels every later await as well: the decoding stops, the slot is released, the request is
    counted as 499, and nothing raises. (The server log once showed "aclose(): asynchronous
    generator is already running" on this path; this in-process run did not reproduce that,
    it holds the rest.)"""
    import anyio

    from bentowhisper.server.audio import decode_audio
    from bentowhisper.server.longform import TranscribeOptions
    from bentowhisper.server.serving import Admission, Backend, started

    calls: list[str] = []

    async def slow(jobs):
        calls.append("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            calls.append("cancelled")
            raise

    backend = Backend(
        settings=Settings(model="tiny.en"),
        vocab=tiny_vocab,
        features=lambda window: np.zeros((80, 3000), np.float32),
        decode=slow,
        admission=Admission(4),
    )
    audio = decode_audio(JFK)  # speech, so the default chunking (VAD) sends it to decode

    async def main() -> list:
        got: list = []
        with started(backend, "transcriptions") as run:
            run.admit()
            events = run.stream(backend.events(audio, TranscribeOptions()), asyncio.Event().wait)

        async def consume() -> None:
            async for event in events:
                got.append(event)

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await asyncio.sleep(0.5)
            group.cancel_scope.cancel()
        await asyncio.sleep(0.1)  # the cancelled step finishes on its own
        return got

    from prometheus_client import REGISTRY

    labels = {"endpoint": "transcriptions", "response_format": "unknown", "status": "499"}
    before = REGISTRY.get_sample_value("bentowhisper_requests_total", labels) or 0.0
    assert asyncio.run(main()) == []
    assert calls == ["started", "cancelled"], calls
    assert backend.admission.active == 0
    assert REGISTRY.get_sample_value("bentowhisper_requests_total", labels) == before + 1
