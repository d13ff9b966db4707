"""What the tests share: where the eval set is, media made with FFmpeg, raw HTTP, metrics, and
(from :mod:`bentowhisper.launcher`) a ``bentoml serve`` started and stopped the way a user does.

Test modules import this module (``tests`` is on pytest's ``pythonpath``), never each other.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

from bentowhisper.config import load_settings
from bentowhisper.engine.loading import WhisperBundle, load_whisper
from bentowhisper.engine.local import Batcher  # noqa: F401 - re-exported for the tests
from bentowhisper.launcher import (  # noqa: F401 - the tests' server harness, re-exported
    BentoServer,
    Shutdown,
    bentoml_command,
    descendants,
    free_port,
    start_server,
)
from bentowhisper.server.audio import SAMPLE_RATE, decode_audio
from bentowhisper.server.instance import WORKER_MODULE

try:  # openai >= 3 talks through the httpx2 fork; any httpx-like client does for probes
    import httpx
except ImportError:  # pragma: no cover - depends on the installed packages
    import httpx2 as httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared eval set sits beside the repository (``<clone>/../shared/eval``), wherever the
# repository is cloned; BENTOWHISPER_EVAL_DIR points elsewhere when set.
EVAL_DIR = Path(os.environ.get("BENTOWHISPER_EVAL_DIR") or REPO_ROOT.parent / "shared" / "eval")
ERROR_KEYS = {"message", "type", "param", "code"}  # OpenAI's error envelope, all four always


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


# --------------------------------------------------------------------------------------------
# a served transcription as its client meets it, and the model service's workers (faults)

TRANSCRIBE = "/v1/audio/transcriptions"
MODEL_WORKER = "--service-name whisper-model"


def longform_mp3(seconds: float) -> bytes:
    """The longform eval clip (16 LJSpeech clips in a row, 106 s), looped or cut to ``seconds``,
    as 32 kbit/s mono MP3 (about 0.25 MB a minute)."""
    return ffmpeg(
        "-stream_loop", "-1", "-i", str(EVAL_DIR / LONGFORM), "-t", str(seconds), "-ac", "1",
        "-ar", "16000", "-c:a", "libmp3lame", "-b:a", "32k", "-f", "mp3",
    )  # fmt: skip


def decodes(url: str) -> float:
    """Decode calls the model service has finished (any status)."""
    return metric(url, "bentoml_service_request_total", endpoint="/decode")


def model_workers(server: BentoServer) -> list[int]:
    """Pids of the model service's worker processes (the API worker is ``bentowhisper``)."""
    return [
        pid
        for (pid, _), cmdline in descendants(server.proc.pid).items()
        if WORKER_MODULE in cmdline and MODEL_WORKER in cmdline
    ]


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@dataclass
class Outcome:
    status: int | str  # an HTTP status, or the client error's name
    body: dict | None  # the JSON body; for a stream its last event
    seconds: float
    events: list[dict] | None = None  # a stream's events
    headers: httpx.Headers | None = None

    @property
    def failed_in_band(self) -> bool:
        """A stream that answered 200 and then reported an error event."""
        return self.events is not None and "error" in (self.body or {})


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def outcome_of(response: httpx.Response, started: float, stream: bool) -> Outcome:
    seconds = time.monotonic() - started
    if stream and response.status_code == 200:
        events = sse_events(response.text)
        return Outcome(200, events[-1] if events else None, seconds, events)
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:300]}
    return Outcome(response.status_code, body, seconds)


def post_audio(url: str, audio: bytes, timeout_s: float, *, stream: bool = False) -> Outcome:
    """An MP3 posted to the transcriptions endpoint with httpx, as it ends for the client."""
    started = time.monotonic()
    data = {"model": "whisper-1", **({"stream": "true"} if stream else {})}
    try:
        response = httpx.post(
            url + TRANSCRIBE,
            files={"file": ("speech.mp3", audio, "audio/mpeg")},
            data=data,
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        return Outcome(type(exc).__name__, None, time.monotonic() - started)
    return outcome_of(response, started, stream)


def assert_envelope(outcome: Outcome) -> None:
    assert isinstance(outcome.body, dict) and set(outcome.body) == {"error"}, outcome
    assert set(outcome.body["error"]) == ERROR_KEYS, outcome


# --------------------------------------------------------------------------------------------
# transcripts and the engine in-process

JFK = "audio/en_misc/jfk.flac"
JFK_TEXT = (
    "And so, my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)
LONGFORM = "audio/longform/ljspeech_LJ001-0001_to_0016.flac"
CLIP = EVAL_DIR / "audio" / "en_ljspeech" / "LJ001-0001.wav"  # 9.7 s, one reader, dev set
# The engine as the CPU profile serves it (dtype and quantization auto, the hybrid attention),
# without this environment's overrides.
PROFILE = load_settings({})
english = EnglishTextNormalizer()
basic = BasicTextNormalizer()


def wer(ref: str, hyp: str, normalizer=english) -> float:
    return jiwer.wer(normalizer(ref), normalizer(hyp))


@functools.cache
def load_audio(path: str) -> np.ndarray:
    """16 kHz mono samples of an eval clip (``path`` relative to the eval folder)."""
    return decode_audio(EVAL_DIR / path)


def manifest() -> dict[str, dict[str, Any]]:
    lines = (EVAL_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return {clip["id"]: clip for clip in map(json.loads, filter(None, lines))}


def words(text: str) -> list[str]:
    return basic(text).split()


def load_profile_model(converted_models_dir, name: str) -> WhisperBundle:
    return load_whisper(
        str(converted_models_dir / name),
        device="cpu",
        dtype=PROFILE.dtype,
        attn_implementation=PROFILE.attn_implementation,
    )


# --------------------------------------------------------------------------------------------
# noise for the VAD and chunking tests


def speech_then(noise: Callable[[float, float], np.ndarray], level: float) -> np.ndarray:
    """jfk, then 90 s of ``noise(seconds, dbfs)`` at ``level`` dBFS."""
    return np.concatenate([load_audio(JFK), noise(90, level)])


def white(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))
    return scaled(noise, dbfs)


def pink(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    """1/f noise: white noise shaped in the frequency domain."""
    n = int(seconds * SAMPLE_RATE)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    return scaled(np.fft.irfft(spectrum, n), dbfs)


def hum(seconds: float, hz: float, dbfs: float) -> np.ndarray:
    """Mains hum: the fundamental and its odd harmonics, as a transformer's buzz has."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = sum(np.sin(2 * np.pi * hz * k * t) / k for k in (1, 3, 5, 7))
    return scaled(wave, dbfs)


def scaled(signal: np.ndarray, dbfs: float) -> np.ndarray:
    """``signal`` at an RMS level of ``dbfs``."""
    rms = np.sqrt(np.mean(np.square(signal)))
    return (signal * (10 ** (dbfs / 20) / rms)).clip(-1, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# realtime: limits of the tight-limit server (conftest's ``tiny_server``)

MAX_TURN_S = 15.0
MAX_MESSAGE_KB = 64
IDLE_TIMEOUT_S = 4.0
MAX_SESSIONS = 12


def audio_leftovers(server: BentoServer) -> list[str]:
    """The decoder temp dirs in the server's ``TMPDIR`` (none once its requests are done)."""
    return sorted(p.name for p in Path(server.env["TMPDIR"]).glob("bentowhisper-audio-*"))


def serve_tiny(tmp: Path, models_dir: Path, **env: str) -> BentoServer:
    """``bentoml serve`` with tiny.en (cheap to decode on a CPU), no speaker encoder, no API
    keys unless ``env`` sets them, and a ``TMPDIR`` of its own (see :func:`audio_leftovers`);
    ready when it returns."""
    (tmp / "tmp").mkdir(parents=True)
    running = start_server(
        log_dir=tmp,
        env={
            "BENTOML_HOME": str(tmp / "bentoml-home"),
            "BENTOWHISPER_MODELS_DIR": str(models_dir),
            "BENTOWHISPER_MODEL": "tiny.en",
            "BENTOWHISPER_DIARIZATION": "false",  # one process fewer to start
            "BENTOWHISPER_API_KEYS": "",
            "BENTOWHISPER_API_KEY_FILE": "",
            "TMPDIR": str(tmp / "tmp"),
            **env,
        },
    )
    try:
        running.wait_ready(timeout_s=400)  # two cores shared with other test runs
    except BaseException:
        running.stop()
        raise
    return running
