"""A corpus of bad inputs against the real server: each gets a precise OpenAI-shaped 4xx, fast.

Every case is a row of :data:`CASES`: an id, a function that sends one request to the running
``server`` (session fixture, conftest.py: the CPU profile, ``BENTOWHISPER_MAX_UPLOAD_MB=4``,
``max_audio_seconds`` 3 h) and the status, ``param`` and (where the server sets one) ``code``
it must get back. The media are made by the test with the same FFmpeg build the server uses
(``imageio_ffmpeg``) and with numpy; nothing is downloaded. Error bodies must be exactly
OpenAI's envelope (``{"error": {message, type, param, code}}``), every reply must come within
:data:`BOUND_S` (client timeouts turn a hang into a failure), and after every case the service
must still answer ``/livez`` and ``/readyz``. A few rows are positive controls (a WAV named
``.mp3``, a lying content type): detection is by content, so those must succeed.

Requests go out on the raw wire (httpx, a hand-built multipart body, or a socket) where the
point is the framing, and through the unmodified ``openai`` SDK where a client would.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from support import ERROR_KEYS, EVAL_DIR, Part, ffmpeg, http_request, multipart

JFK = EVAL_DIR / "audio/en_misc/jfk.flac"
GERMAN = EVAL_DIR / "audio/fleurs_de/fleurs-de-000.ogg"
API_KEY = "test-key"
BOUND_S = 30.0  # every reply, error or not, must come within this
PROBE_S = 2.0  # health probes after each case
UPLOAD_LIMIT = 4 * 1024 * 1024  # BENTOWHISPER_MAX_UPLOAD_MB=4 in the session server
TRANSCRIBE = "/v1/audio/transcriptions"
TRANSLATE = "/v1/audio/translations"
ANY = object()  # "don't check this field"
NO_REPLY = 0  # status of a raw exchange that got no HTTP response (closed or timed out)

# The encodings every truncation case starts from: (extension, FFmpeg output arguments).
ENCODINGS = {
    "wav": ["-c:a", "pcm_s16le", "-f", "wav"],
    "flac": ["-c:a", "flac", "-f", "flac"],
    "mp3": ["-c:a", "libmp3lame", "-b:a", "32k", "-f", "mp3"],
    "ogg": ["-c:a", "libvorbis", "-q:a", "0", "-f", "ogg"],
    "opus": ["-c:a", "libopus", "-b:a", "16k", "-f", "opus"],
    "m4a": ["-c:a", "aac", "-b:a", "32k", "-f", "ipod"],
    "mp4": ["-c:a", "aac", "-b:a", "32k", "-f", "mp4"],
    "webm": ["-c:a", "libopus", "-b:a", "16k", "-f", "webm"],
}

pytestmark = pytest.mark.skipif(not JFK.exists(), reason=f"eval set not found at {EVAL_DIR}")


# --------------------------------------------------------------------------------------------
# Media, made here


def wav_bytes(
    samples: np.ndarray,
    rate: int,
    *,
    float32: bool = False,
    data_size: int | None = None,
) -> bytes:
    """A canonical 44-byte-header WAV of ``samples`` (frames x channels, in [-1, 1]).

    ``float32`` writes IEEE float (format 3) samples as given, NaN included; ``data_size``
    overrides the size the header states for the data chunk (and the RIFF size with it).
    """
    frames = samples.reshape(len(samples), -1)
    channels = frames.shape[1]
    if float32:
        payload, fmt, width = frames.astype("<f4").tobytes(), 3, 4
    else:
        pcm = np.clip(np.nan_to_num(frames), -1, 1) * 32767
        payload, fmt, width = pcm.astype("<i2").tobytes(), 1, 2
    size = len(payload) if data_size is None else data_size
    header = b"RIFF" + struct.pack("<I", min(size + 36, 0xFFFFFFFF)) + b"WAVE"
    header += b"fmt " + struct.pack(
        "<IHHIIHH", 16, fmt, channels, rate, rate * channels * width, channels * width, width * 8
    )
    header += b"data" + struct.pack("<I", size)
    return header + payload


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * math.pi * 440 * t)
    return np.repeat(mono[:, None], channels, axis=1)


@dataclass(frozen=True)
class Media:
    """Everything the corpus uploads, made once per module."""

    clip: np.ndarray  # the first 3 s of jfk.flac, 16 kHz mono float
    files: dict[str, bytes]

    def __getitem__(self, name: str) -> bytes:
        return self.files[name]


def make_media() -> Media:
    pcm = ffmpeg("-i", str(JFK), "-t", "3", "-ac", "1", "-ar", "16000", "-f", "f32le")
    clip = np.frombuffer(pcm, dtype="<f4").copy()
    files: dict[str, bytes] = {"jfk3.wav": wav_bytes(clip, 16000)}
    for ext, out in ENCODINGS.items():
        files[f"jfk3.{ext}"] = ffmpeg("-i", str(JFK), "-t", "3", "-ac", "1", *out)
        files[f"truncated.{ext}"] = files[f"jfk3.{ext}"][:100]
    lavfi = ["-f", "lavfi", "-i"]
    files["image.png"] = ffmpeg(
        *lavfi, "testsrc=size=32x32", "-frames:v", "1", "-c:v", "png", "-f", "image2"
    )
    files["video-no-audio.mp4"] = ffmpeg(
        *lavfi,
        "testsrc=size=64x64:rate=10",
        "-t",
        "1",
        "-c:v",
        "mpeg4",
        "-f",
        "mp4",
    )
    # 4 h of digital silence at 1 kHz: ~200 kB of FLAC that decodes to 4 h (a "zip bomb").
    files["silence-4h.flac"] = ffmpeg(
        *lavfi, "anullsrc=r=1000:cl=mono", "-t", "14400", "-c:a", "flac", "-f", "flac"
    )
    noisy = clip.copy()
    noisy[::50] = np.nan
    noisy[1::97] = np.inf
    noisy[2::89] = -np.inf
    files["nan.wav"] = wav_bytes(noisy, 16000, float32=True)
    files["all-nan.wav"] = wav_bytes(np.full(16000, np.nan, dtype=np.float32), 16000, float32=True)
    files["rate-1mhz.wav"] = wav_bytes(tone(0.2, 1_000_000), 1_000_000)
    files["rate-0.wav"] = wav_bytes(tone(0.5, 16000), 0)
    files["channels-16.wav"] = wav_bytes(tone(0.25, 16000, channels=16), 16000)
    files["channels-64.wav"] = wav_bytes(tone(0.25, 16000, channels=64), 16000)
    files["channels-0.wav"] = (
        wav_bytes(tone(0.5, 16000), 16000)[:22]
        + struct.pack("<H", 0)
        + wav_bytes(tone(0.5, 16000), 16000)[24:]
    )
    files["claims-4gb.wav"] = wav_bytes(clip, 16000, data_size=0xFFFFFFF0)
    files["header-only.wav"] = wav_bytes(clip, 16000)[:44]
    # Manifests that would make FFmpeg open other files on the server (refused by the whitelist).
    files["playlist.m3u8"] = (
        f"#EXTM3U\n#EXT-X-TARGETDURATION:11\n#EXTINF:11,\nfile:{JFK}\n#EXT-X-ENDLIST\n".encode()
    )
    files["list.ffconcat"] = f"ffconcat version 1.0\nfile '{JFK}'\n".encode()
    files["random.bin"] = np.random.default_rng(7).bytes(64 * 1024)
    files["text.wav"] = b"This is not audio, just a text file with a .wav name.\n" * 20
    return Media(clip=clip, files=files)


# --------------------------------------------------------------------------------------------
# Sending


@dataclass(frozen=True)
class Reply:
    status: int  # NO_REPLY when the connection closed or timed out without a response
    headers: dict[str, str]
    body: bytes
    elapsed: float


@dataclass(frozen=True)
class Ctx:
    url: str  # server root, http://127.0.0.1:PORT
    http: httpx.Client  # raw, on the server root, bounded by BOUND_S
    sdk: openai.OpenAI  # the unmodified SDK on url + /v1, no retries
    media: Media

    @property
    def port(self) -> int:
        return httpx.URL(self.url).port or 80


def audio_part(data: bytes, filename: str = "audio.wav", content_type: str = "audio/wav") -> Part:
    return ("file", data, filename, content_type)


def fields(**values: str | bytes) -> list[Part]:
    return [(name, value, None, None) for name, value in values.items()]


def timed(send: Callable[[], httpx.Response]) -> Reply:
    started = time.monotonic()
    response = send()
    elapsed = time.monotonic() - started
    return Reply(response.status_code, dict(response.headers), response.content, elapsed)


def post_parts(ctx: Ctx, parts: Iterable[Part], path: str = TRANSCRIBE) -> Reply:
    body, content_type = multipart(parts)
    return timed(lambda: ctx.http.post(path, content=body, headers={"content-type": content_type}))


def upload(
    data: bytes | str,
    *,
    filename: str = "audio.wav",
    content_type: str = "audio/wav",
    path: str = TRANSCRIBE,
    **form: str | bytes,
) -> Callable[[Ctx], Reply]:
    """A request builder: ``data`` (bytes, or a name in :class:`Media`) as ``file`` plus fields
    (``model=whisper-1`` unless given)."""
    form.setdefault("model", "whisper-1")

    def send(ctx: Ctx) -> Reply:
        content = ctx.media[data] if isinstance(data, str) else data
        parts = [audio_part(content, filename, content_type), *fields(**form)]
        return post_parts(ctx, parts, path)

    return send


def clip(**form: str | bytes) -> Callable[[Ctx], Reply]:
    """The 3 s jfk WAV with the given fields: the request is only wrong in its fields."""
    return upload("jfk3.wav", **form)


def sdk(call: str = "transcriptions", **kwargs: Any) -> Callable[[Ctx], Reply]:
    """A builder that goes through ``openai.OpenAI``. ``file``: a :class:`Media` name, or the
    SDK's tuple (filename, content[, content type]) whose content may be a Media name."""

    def send(ctx: Ctx) -> Reply:
        args = dict(kwargs)
        args.setdefault("model", "whisper-1")
        file = args.pop("file", "jfk3.wav")
        if isinstance(file, str):
            file = (file, file)
        name, content, *rest = file  # (filename, bytes or a Media name[, content type])
        args["file"] = (name, ctx.media[content] if isinstance(content, str) else content, *rest)
        endpoint = getattr(ctx.sdk.audio, call).with_raw_response
        started = time.monotonic()
        try:
            raw = endpoint.create(**args)
            response = raw.http_response
        except openai.APIStatusError as exc:
            response = exc.response
        elapsed = time.monotonic() - started
        return Reply(response.status_code, dict(response.headers), response.content, elapsed)

    return send


def raw_exchange(port: int, request: bytes, *, wait_s: float = 5.0) -> Reply:
    """Send bytes on a fresh socket and read one response, giving up after ``wait_s``.

    For requests httpx will not send (a lying Content-Length). ``NO_REPLY`` if the server
    closed the connection or said nothing in time: both are acceptable for a broken framing.
    """
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(request)
        sock.settimeout(0.5)
        while time.monotonic() - started < wait_s:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if _complete(received):
                    break
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            received += chunk
            if _complete(received):
                break
    elapsed = time.monotonic() - started
    if not received.startswith(b"HTTP/1.1 "):
        return Reply(NO_REPLY, {}, received, elapsed)
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    if "content-length" in headers:  # only the first response (more may follow on the socket)
        body = body[: int(headers["content-length"])]
    return Reply(int(lines[0].split()[1]), headers, body, elapsed)


def _complete(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return len(body) >= int(value.strip())
    return False


def lying_length(extra: int) -> Callable[[Ctx], Reply]:
    """A multipart body whose Content-Length claims ``extra`` more bytes than are sent."""

    def send(ctx: Ctx) -> Reply:
        body, content_type = multipart(
            [audio_part(ctx.media["jfk3.wav"]), *fields(model="whisper-1")]
        )
        headers = {"Content-Type": content_type, "Content-Length": str(len(body) + extra)}
        return raw_exchange(ctx.port, http_request("POST", TRANSCRIBE, headers, body), wait_s=3.0)

    return send


FIVE_MIB = 5 * 1024 * 1024


def chunked_oversize(ctx: Ctx) -> Reply:
    """5 MiB streamed without Content-Length (chunked): refused once 4 MiB have arrived."""
    boundary = "chunked-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(80):
            yield bytes(64 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    try:
        return timed(lambda: ctx.http.post(TRANSCRIBE, content=chunks(), headers=headers))
    except httpx.TransportError:  # the server answered and closed before we finished sending
        return Reply(NO_REPLY, {}, b"", 0.0)


def raw(method: str, path: str, **kwargs: Any) -> Callable[[Ctx], Reply]:
    return lambda ctx: timed(lambda: ctx.http.request(method, path, **kwargs))


def wav_part(ctx: Ctx) -> Part:
    return audio_part(ctx.media["jfk3.wav"])


MODEL: Part = ("model", "whisper-1", None, None)


def form(
    *items: Part | Callable[[Ctx], Part], content_type: str | None = None
) -> Callable[[Ctx], Reply]:
    """A builder of a hand-made multipart body from parts (or part builders, for media), sent
    with its own Content-Type unless ``content_type`` overrides it."""

    def send(ctx: Ctx) -> Reply:
        built = [item(ctx) if callable(item) else item for item in items]
        body, own_type = multipart(built)
        headers = {"content-type": content_type or own_type}
        return timed(lambda: ctx.http.post(TRANSCRIBE, content=body, headers=headers))

    return send


def claims_5mib(ctx: Ctx) -> Reply:
    """Headers only, stating a 5 MiB body: refused before any of it is sent."""
    headers = {
        "Content-Type": "multipart/form-data; boundary=b",
        "Content-Length": str(FIVE_MIB),
    }
    return raw_exchange(ctx.port, http_request("POST", TRANSCRIBE, headers), wait_s=5.0)


# --------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable[[Ctx], Reply]
    status: int | tuple[int, ...]  # a tuple: any of these (where the outcome is legitimately open)
    param: object = ANY  # the error's param (None: must be null); ANY: not checked
    code: object = ANY  # the error's code, where the server sets a stable one


def bad_file(code: str) -> dict[str, object]:
    return {"status": 400, "param": "file", "code": code}


def bad(param: str | None) -> dict[str, object]:
    return {"status": 400, "param": param}


OK: dict[str, object] = {"status": 200}
UNDECODABLE = bad_file("undecodable")
# Either a transcription or a clean 400 naming the file: FFmpeg's limits decide, never a 5xx.
OPEN: dict[str, object] = {"status": (200, 400), "param": "file"}
EXTRA_FIELDS = [(f"extra{i}", "1", None, None) for i in range(100)]
VAD_THRESHOLD_2 = {"chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": "2"}
TRUNCATED_CODE = {"wav": "no_samples"}  # 100 bytes of WAV: a valid header and 28 bytes of data

CASES: list[Case] = [
    # --- content that is not (usable) audio: 400, param "file" and a stable code ---
    Case("random-bytes", sdk(file="random.bin"), **UNDECODABLE),
    Case("zero-length", upload(b""), **bad_file("empty")),
    *(
        Case(
            f"truncated-{ext}",
            upload(f"truncated.{ext}", filename=f"a.{ext}"),
            **bad_file(TRUNCATED_CODE.get(ext, "undecodable")),
        )
        for ext in ENCODINGS
    ),
    Case("wav-header-only", upload("header-only.wav"), **bad_file("no_samples")),
    Case("text-named-wav", upload("text.wav"), **UNDECODABLE),
    Case(
        "png-image", upload("image.png", filename="a.png", content_type="image/png"), **UNDECODABLE
    ),
    Case("video-without-audio", upload("video-no-audio.mp4"), **bad_file("no_audio_stream")),
    Case("flac-4h-of-silence-200kb", upload("silence-4h.flac"), **bad_file("too_long")),
    Case("hls-playlist-naming-a-server-file", upload("playlist.m3u8"), **UNDECODABLE),
    Case("ffconcat-naming-a-server-file", upload("list.ffconcat"), **UNDECODABLE),
    Case("wav-sample-rate-0", upload("rate-0.wav"), **UNDECODABLE),
    Case("wav-channels-0", upload("channels-0.wav"), **UNDECODABLE),
    Case("wav-sample-rate-1mhz", upload("rate-1mhz.wav"), **OPEN),
    Case("wav-64-channels", upload("channels-64.wav"), **OPEN),
    # --- positive controls: detection is by content, and odd but valid input succeeds ---
    Case("wav-named-mp3", sdk(file=("speech.mp3", "jfk3.wav", "audio/mpeg")), **OK),
    Case(
        "flac-sent-as-text-plain",
        upload("jfk3.flac", filename="a.txt", content_type="text/plain"),
        **OK,
    ),
    Case("path-in-filename", upload("jfk3.ogg", filename="../../../etc/passwd"), **OK),
    Case("empty-filename", upload("jfk3.mp3", filename=""), **OK),
    Case("wav-16-channels", upload("channels-16.wav"), **OK),
    Case("nan-and-inf-float-wav", upload("nan.wav"), **OK),
    Case("all-nan-float-wav", upload("all-nan.wav"), **UNDECODABLE),
    Case("wav-header-claims-4gb", upload("claims-4gb.wav"), **OK),
    Case("prompt-not-utf8", clip(prompt=b"caf\xe9 \xff\xfe na\xefve"), **OK),
    Case("prompt-1000kb", clip(prompt="Kennedy " * 125_000), **OK),
    Case("language-with-spaces-and-case", clip(language=" English "), **OK),
    Case("language-empty-means-detect", clip(language=""), **OK),
    Case("translation-ignores-language", upload("jfk3.wav", path=TRANSLATE, language="de"), **OK),
    # --- the form: the field at fault is named in param ---
    Case("no-file-part", form(MODEL), **bad("file")),
    Case("file-as-text-field", form(MODEL, ("file", "audio.wav", None, None)), **bad("file")),
    Case(
        "file-part-without-filename",
        form(MODEL, lambda ctx: ("file", ctx.media["jfk3.wav"], None, "audio/wav")),
        **bad("file"),
    ),
    Case("two-files", form(MODEL, wav_part, wav_part), **bad(None)),
    Case("prompt-2mb-over-part-limit", clip(prompt="x" * (2 * 1024 * 1024)), **bad(None)),
    Case("101-fields", form(MODEL, wav_part, *EXTRA_FIELDS), **bad(None)),
    Case("language-unknown", sdk(language="xx"), **bad("language")),
    Case("language-region-code", clip(language="en-US"), **bad("language")),
    Case("temperature-negative", sdk(temperature=-1), **bad("temperature")),
    Case("temperature-2", sdk(temperature=2), **bad("temperature")),
    Case("temperature-abc", clip(temperature="abc"), **bad("temperature")),
    Case("temperature-nan", clip(temperature="nan"), **bad("temperature")),
    Case("temperature-inf", clip(temperature="inf"), **bad("temperature")),
    Case("response-format-xml", clip(response_format="xml"), **bad("response_format")),
    Case(
        "granularity-char",
        clip(response_format="verbose_json", **{"timestamp_granularities[]": "char"}),
        **bad("timestamp_granularities"),
    ),
    Case(
        "word-granularity-without-verbose-json",
        sdk(timestamp_granularities=["word"]),
        **bad("timestamp_granularities"),
    ),
    Case("stream-maybe", clip(stream="maybe"), **bad("stream")),
    Case("include-unknown", clip(**{"include[]": "tokens"}), **bad("include")),
    Case("chunking-threshold-2", clip(**VAD_THRESHOLD_2), **bad("chunking_strategy")),
    Case("chunking-unknown-string", clip(chunking_strategy="manual"), **bad("chunking_strategy")),
    Case("model-missing", form(wav_part), **bad("model")),
    Case("model-empty", clip(model=""), **bad("model")),
    Case(
        "model-unknown", sdk(model="whisper-9"), status=404, param="model", code="model_not_found"
    ),
    Case("translation-bad-file", upload("random.bin", path=TRANSLATE), **UNDECODABLE),
    Case(
        "translation-response-format-xml",
        upload("jfk3.wav", path=TRANSLATE, response_format="xml"),
        **bad("response_format"),
    ),
    # --- the wire: media types, framing, sizes, methods, paths ---
    Case(
        "json-body", raw("POST", TRANSCRIBE, json={"model": "whisper-1"}), status=415, param="file"
    ),
    Case(
        "form-urlencoded",
        raw("POST", TRANSCRIBE, data={"model": "whisper-1"}),
        status=415,
        param="file",
    ),
    Case("no-content-type", raw("POST", TRANSCRIBE, content=b"abc"), status=415, param="file"),
    Case(
        "multipart-wrong-boundary",
        form(MODEL, wav_part, content_type="multipart/form-data; boundary=other"),
        **bad(None),
    ),
    Case(
        "multipart-no-boundary",
        form(MODEL, wav_part, content_type="multipart/form-data"),
        **bad(None),
    ),
    Case(
        "multipart-garbage",
        raw(
            "POST",
            TRANSCRIBE,
            content=bytes(range(256)) * 8,
            headers={"content-type": "multipart/form-data; boundary=b"},
        ),
        **bad(None),
    ),
    Case("content-length-longer-than-body", lying_length(10_000), status=(NO_REPLY, 400)),
    # The body is cut inside the file part: the "model" part after it never arrives.
    Case("content-length-shorter-than-body", lying_length(-200), **bad("model")),
    Case("content-length-claims-5mib", claims_5mib, status=413, param="file"),
    Case("upload-5mib", sdk(file=("big.wav", bytes(FIVE_MIB))), status=413, param="file"),
    Case("upload-5mib-chunked", chunked_oversize, status=413, param="file"),
    # OpenAI answers a wrong method with 404 "Invalid URL (GET /v1/...)"; so does this server.
    Case("get-on-post-route", raw("GET", TRANSCRIBE), status=404, param=None),
    Case(
        "unknown-audio-path",
        raw("POST", "/v1/audio/speech", json={"input": "hi"}),
        status=404,
        param=None,
    ),
    Case("unknown-v1-path", raw("GET", "/v1/files"), status=404, param=None),
    Case("unknown-model-retrieve", raw("GET", "/v1/models/nope"), status=404, param="model"),
    # found by the fuzzer: BentoML's router itself cannot route a line break in the path
    Case("line-break-in-path", raw("GET", "/v1/models/%0Awhisper-1"), status=404, param=None),
]


# --------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def media() -> Media:
    return make_media()


@pytest.fixture(scope="module")
def ctx(server, media) -> Iterator[Ctx]:
    timeout = httpx.Timeout(BOUND_S, connect=5.0)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(base_url=server.url, headers=headers, timeout=timeout) as http,
        openai.OpenAI(
            base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=BOUND_S
        ) as client,
    ):
        yield Ctx(url=server.url, http=http, sdk=client, media=media)


def check(case: Case, reply: Reply) -> None:
    """The reply is what the case expects, in OpenAI's shape, and came within the bound."""
    allowed = case.status if isinstance(case.status, tuple) else (case.status,)
    shown = f"{case.id}: HTTP {reply.status} {reply.body[:500]!r}"
    assert reply.status in allowed, shown
    assert reply.elapsed < BOUND_S, f"{case.id}: {reply.elapsed:.1f} s"
    if reply.status == NO_REPLY:
        return
    content_type = reply.headers.get("content-type", "")
    assert content_type.startswith("application/json"), (content_type, shown)
    body = json.loads(reply.body)
    if reply.status == 200:
        assert isinstance(body.get("text"), str), shown
        return
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, shown
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], shown
    assert error["type"] == "invalid_request_error", shown
    if case.param is not ANY:
        assert error["param"] == case.param, shown
    if case.code is not ANY:
        assert error["code"] == case.code, shown


def assert_healthy(url: str) -> None:
    with httpx.Client(base_url=url, timeout=PROBE_S) as probe:
        for path in ("/livez", "/readyz"):
            response = probe.get(path)
            assert response.status_code == 200, (path, response.status_code, response.text)


def test_corpus_is_large_and_distinct() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert sum(case.status != 200 for case in CASES) >= 40


def server_errors(url: str) -> float:
    """Audio requests the server has counted with a 5xx status (``bentowhisper_requests``)."""
    text = httpx.get(url + "/metrics", timeout=PROBE_S * 5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("bentowhisper_requests_total{") and 'status="5' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def errors_before(ctx: Ctx) -> float:
    return server_errors(ctx.url)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(ctx: Ctx, errors_before: float, case: Case) -> None:
    reply = case.send(ctx)
    try:
        check(case, reply)
    finally:
        assert_healthy(ctx.url)


def test_still_transcribes_after_the_corpus(ctx: Ctx, errors_before: float) -> None:
    # No case was even counted as a 5xx (a client that left mid-upload is a 499, not a 500).
    assert server_errors(ctx.url) == errors_before
    result = ctx.sdk.audio.transcriptions.create(
        model="whisper-1", file=("jfk.flac", JFK.read_bytes(), "audio/flac"), timeout=120
    )
    assert "ask not what your country can do for you" in result.text.lower(), result.text
