"""Turn any uploaded audio into what Whisper wants: 16 kHz mono float32 in [-1, 1].

Decoding is done by an FFmpeg child process rather than a Python binding because FFmpeg reads
every container and codec clients send (including video files with an audio track), and a
separate process can be killed when a hostile or broken upload makes it hang.

Design choices, each for a reason:

* Format detection is by content only. Uploaded bytes go to a temp file whose name has no
  extension, and a path given by the caller is reached through an extension-less symlink, so
  neither a lying file name (``song.txt``) nor a missing one changes how FFmpeg probes it. We
  never pass ``-f`` for the input.
* The input is a real file, not a pipe: MP4/M4A files written without ``+faststart`` keep the
  ``moov`` index at the end, and FFmpeg can only reach it by seeking.
* Only demuxers for audio/media containers are allowed (:data:`ALLOWED_DEMUXERS`) and only the
  ``file`` protocol. Otherwise an uploaded DASH manifest or playlist could make FFmpeg open
  other files on the server (or URLs) and we would transcribe those for the client.
* Every call gets its own temp directory (prefix :data:`TEMP_DIR_PREFIX`) that is removed in a
  ``finally``; the child runs in its own process group and is killed and reaped on timeout,
  error or interruption, so nothing outlives the call.
* Downmixing averages the channels (``-rematrix_maxval 1``), as integer output would; FFmpeg's
  float path otherwise sums stereo at 0.707 each and clips loud recordings.
* ``max_seconds`` is enforced by FFmpeg itself (``-t``) so a three-hour upload against a
  ten-minute limit costs ten minutes of decoding, not three hours of memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = [
    "ALLOWED_DEMUXERS",
    "SAMPLE_RATE",
    "SUPPORTED_FORMATS",
    "TEMP_DIR_PREFIX",
    "AudioDecodeError",
    "AudioDecodeTimeoutError",
    "AudioTooLongError",
    "EmptyAudioError",
    "FFmpegNotFoundError",
    "NoAudioStreamError",
    "UndecodableAudioError",
    "decode_audio",
    "duration_seconds",
    "find_ffmpeg",
]

SAMPLE_RATE = 16000
"""Whisper's feature extractor expects exactly this rate."""

SUPPORTED_FORMATS = (
    "flac",
    "mp3",
    "mp4",
    "mpeg",
    "mpga",
    "m4a",
    "ogg",
    "oga",
    "opus",
    "wav",
    "webm",
    "aiff",
)
"""What we advertise (OpenAI's list plus extras). Detection is by content, so this is documentation
for clients and error messages, not a filter on file names."""

ALLOWED_DEMUXERS = (
    # The advertised formats.
    "flac",
    "mp3",  # mp3, mpga, mp2 and "audio/mpeg"
    "mov",  # the "mov,mp4,m4a,3gp,3g2,mj2" demuxer
    "mpeg",  # MPEG program stream
    "ogg",  # vorbis, opus, oga, speex, flac-in-ogg
    "matroska",  # the "matroska,webm" demuxer
    "wav",
    "aiff",
    # Other audio and A/V containers people record or export in.
    "aac",
    "ac3",
    "eac3",
    "amr",
    "amrnb",
    "amrwb",
    "ape",
    "asf",
    "au",
    "avi",
    "caf",
    "dts",
    "flv",
    "loas",
    "mpc",
    "mpc8",
    "mpegts",
    "mxf",
    "shn",
    "tta",
    "w64",
    "wv",
)
"""FFmpeg demuxer names allowed as input (passed as ``-format_whitelist``). Probing still picks the
demuxer by content; anything outside this list, notably the playlist and manifest demuxers (HLS,
DASH, concat) that open further files, is refused."""

TEMP_DIR_PREFIX = "bentowhisper-audio-"
"""Prefix of the per-call temp directories under :func:`tempfile.gettempdir`, so that leftovers
(there should be none) are easy to find."""

FFMPEG_ENV = "BENTOWHISPER_FFMPEG"

# `-t` is given this much beyond max_seconds, so that "longer than the limit" is observable in the
# output without decoding the rest of a long file.
_LIMIT_OVERSHOOT_S = 1.0
# Decoded length may exceed the container's nominal length by codec padding and resampler
# rounding (tens of ms); a file "exactly at the limit" must not be rejected for that.
_LIMIT_TOLERANCE_S = 0.1
_READ_CHUNK = 1 << 20
_STDERR_KEEP = 64 * 1024
_NO_STREAM_PATTERNS = (
    "does not contain any stream",
    "matches no streams",
)
_DURATION_RE = re.compile(r"Duration:\s*(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")


def _formats_hint() -> str:
    return "Supported formats: " + ", ".join(SUPPORTED_FORMATS) + "."


class AudioDecodeError(ValueError):
    """The upload cannot be turned into audio; ``str(exc)`` is safe to show to the client.

    A ``ValueError`` because it is the caller's input that is wrong; the HTTP layer maps it to a
    400 ``invalid_request_error`` with ``param="file"``. ``reason`` is a stable machine-readable
    code (one per subclass); ``detail`` holds FFmpeg's own words for logs, with server paths
    removed, and is not meant for the client.
    """

    reason: str = "undecodable"

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class UndecodableAudioError(AudioDecodeError):
    """FFmpeg could not recognise or decode the content (corrupt, not media, unsupported)."""

    reason = "undecodable"


class EmptyAudioError(AudioDecodeError):
    """The file is 0 bytes (``reason="empty"``) or decoded to no samples (``"no_samples"``)."""

    reason = "empty"

    def __init__(self, message: str, *, detail: str = "", reason: str | None = None) -> None:
        super().__init__(message, detail=detail)
        if reason is not None:
            self.reason = reason


class NoAudioStreamError(AudioDecodeError):
    """The container was read but holds no audio stream (e.g. a silent screen recording)."""

    reason = "no_audio_stream"


class AudioTooLongError(AudioDecodeError):
    """The audio is longer than the server's ``max_seconds``.

    ``duration_seconds`` is the container's stated duration, or ``None`` when it does not state
    one (we stop decoding just past the limit, so we do not measure it ourselves).
    """

    reason = "too_long"

    def __init__(
        self, limit_seconds: float, duration_seconds: float | None, *, detail: str = ""
    ) -> None:
        self.limit_seconds = limit_seconds
        self.duration_seconds = duration_seconds
        if duration_seconds is not None and duration_seconds > limit_seconds:
            length = f"{duration_seconds:.1f} s long"
        else:
            length = f"longer than {limit_seconds:g} s"
        super().__init__(
            f"Audio is {length}; the maximum is {limit_seconds:g} s. Split it into shorter files.",
            detail=detail,
        )


class AudioDecodeTimeoutError(AudioDecodeError):
    """Decoding took longer than ``timeout_s``; the FFmpeg process was killed."""

    reason = "timeout"

    def __init__(self, timeout_s: float, *, detail: str = "") -> None:
        self.timeout_s = timeout_s
        super().__init__(
            f"Decoding the audio took longer than {timeout_s:g} s and was stopped. "
            "Try a shorter file or a common format. " + _formats_hint(),
            detail=detail,
        )


class FFmpegNotFoundError(RuntimeError):
    """No usable FFmpeg binary: a server set-up problem, not the client's fault (so no 400)."""


def find_ffmpeg() -> str:
    """Return the FFmpeg executable to run.

    Order: ``$BENTOWHISPER_FFMPEG`` (a path or a name on PATH; an invalid value is an error
    rather than silently ignored, since someone set it on purpose), then ``ffmpeg`` on PATH (the
    container installs Debian's), then the binary bundled with ``imageio-ffmpeg`` so that a
    plain ``pip install`` works without apt.
    """
    configured = os.environ.get(FFMPEG_ENV, "").strip()
    if configured:
        resolved = shutil.which(configured)
        if resolved is None:
            raise FFmpegNotFoundError(
                f"{FFMPEG_ENV}={configured!r} is not an executable file or a command on PATH"
            )
        return resolved
    on_path = shutil.which("ffmpeg")
    if on_path is not None:
        return on_path
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # ImportError, or RuntimeError when it has no binary
        raise FFmpegNotFoundError(
            f"FFmpeg not found: set {FFMPEG_ENV}, install ffmpeg, or pip install imageio-ffmpeg"
        ) from exc


def duration_seconds(samples: np.ndarray) -> float:
    """Length in seconds of audio as returned by :func:`decode_audio` (16 kHz, mono)."""
    return float(samples.shape[-1]) / SAMPLE_RATE if samples.ndim else 0.0


def decode_audio(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    max_seconds: float | None = None,
    timeout_s: float = 60.0,
) -> np.ndarray:
    """Decode an upload (raw bytes, or a path to a file) to 16 kHz mono float32 samples.

    The format is detected from the content alone. Multi-channel audio is downmixed, the first
    audio stream of a video is used, NaN/inf samples become 0 and the result is clipped to
    [-1, 1] so a malformed float WAV cannot poison the model's features.

    Raises:
        EmptyAudioError: 0-byte input (FFmpeg is not run), or nothing decoded.
        NoAudioStreamError: a media file without an audio stream.
        UndecodableAudioError: anything FFmpeg cannot read.
        AudioTooLongError: the audio is longer than ``max_seconds``.
        AudioDecodeTimeoutError: FFmpeg ran longer than ``timeout_s`` (it is killed).
        FileNotFoundError: ``data`` is a path that does not exist.
        FFmpegNotFoundError: no FFmpeg binary (a deployment problem).
    """
    if timeout_s <= 0 or math.isnan(timeout_s):
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if max_seconds is not None and (max_seconds <= 0 or math.isnan(max_seconds)):
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    deadline = time.monotonic() + timeout_s

    source: Path | None = None
    payload: memoryview | None = None
    if isinstance(data, (str, os.PathLike)):
        source = Path(os.fspath(data)).absolute()
        info = source.stat()  # FileNotFoundError for a bad path: a caller bug, not a 400
        if not stat.S_ISREG(info.st_mode):
            # Devices and FIFOs could be endless (/dev/zero); directories are not audio.
            message = f"{source.name!r} is not a regular file. "
            raise UndecodableAudioError(message + _formats_hint())
        if info.st_size == 0:
            raise EmptyAudioError("The audio file is empty (0 bytes). " + _formats_hint())
    else:
        payload = memoryview(data)
        if payload.nbytes == 0:
            raise EmptyAudioError("The audio file is empty (0 bytes). " + _formats_hint())

    ffmpeg = find_ffmpeg()
    with tempfile.TemporaryDirectory(prefix=TEMP_DIR_PREFIX, ignore_cleanup_errors=True) as tmp:
        tmp_dir = Path(tmp)
        # No extension on purpose: FFmpeg uses extensions as probing hints.
        input_path = tmp_dir / "input"
        if payload is not None:
            with open(input_path, "wb") as fh:
                fh.write(payload)
        elif source is not None:
            try:
                input_path.symlink_to(source)
            except OSError:  # no symlinks here (rare); the name is then only a probing hint
                input_path = source
        return _run_ffmpeg(
            ffmpeg,
            input_path,
            tmp_dir,
            max_seconds=max_seconds,
            deadline=deadline,
            timeout_s=timeout_s,
        )


def _input_args(input_path: Path) -> list[str]:
    # "file:" so a name starting with "-" or containing "proto:" is never read as an option or URL.
    return [
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        ",".join(ALLOWED_DEMUXERS),
        "-i",
        f"file:{input_path}",
    ]


def _run_ffmpeg(
    ffmpeg: str,
    input_path: Path,
    tmp_dir: Path,
    *,
    max_seconds: float | None,
    deadline: float,
    timeout_s: float,
) -> np.ndarray:
    """Run FFmpeg, stream its f32le stdout into memory and turn the outcome into samples/errors.

    POSIX only (selectors on a pipe, process groups): the service runs on Linux.
    """
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-nostats", "-loglevel", "error", "-threads", "0"]
    cmd += _input_args(input_path)
    cmd += ["-vn", "-sn", "-dn", "-map", "0:a:0", "-ac", "1", "-ar", str(SAMPLE_RATE)]
    # With float output FFmpeg's downmix does not normalise: stereo -> mono is 0.707*(L+R), so
    # ordinary stereo speech peaks above 1.0 and would be clipped. maxval 1 gives (L+R)/2, the
    # same as Whisper's reference s16le loader.
    cmd += ["-rematrix_maxval", "1.0"]
    limit_bytes: int | None = None
    if max_seconds is not None:
        cmd += ["-t", f"{max_seconds + _LIMIT_OVERSHOOT_S:.3f}"]
        limit_bytes = 4 * math.ceil((max_seconds + _LIMIT_TOLERANCE_S) * SAMPLE_RATE)
    cmd += ["-f", "f32le", "-"]

    stderr_path = tmp_dir / "ffmpeg.log"
    buf = bytearray()
    too_long = False
    returncode = 0
    with open(stderr_path, "wb") as stderr_file:
        try:
            # stderr goes to a file, not a pipe: a chatty FFmpeg can then never block on a full
            # stderr pipe while we wait on stdout. Own session = own process group to kill.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                start_new_session=True,
            )
        except OSError as exc:
            raise FFmpegNotFoundError(f"cannot run FFmpeg at {ffmpeg!r}: {exc}") from exc
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise AudioDecodeTimeoutError(timeout_s)
                    if not sel.select(remaining):
                        continue
                    chunk = os.read(fd, _READ_CHUNK)
                    if not chunk:
                        break
                    buf += chunk
                    if limit_bytes is not None and len(buf) > limit_bytes:
                        too_long = True
                        break
            if not too_long:
                try:
                    returncode = proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
                except subprocess.TimeoutExpired:
                    raise AudioDecodeTimeoutError(timeout_s) from None
        finally:
            _kill_and_reap(proc)

    stderr = _read_stderr(stderr_path, input_path)
    if too_long:
        assert max_seconds is not None
        stated = _stated_duration(ffmpeg, input_path, deadline)
        raise AudioTooLongError(max_seconds, stated, detail=stderr)
    if returncode != 0:
        _raise_for_failure(returncode, stderr)

    del buf[len(buf) - len(buf) % 4 :]
    if not buf:
        raise EmptyAudioError(
            "The file contains no audio samples. " + _formats_hint(),
            detail=stderr,
            reason="no_samples",
        )
    # bytearray is writable, so this is a zero-copy, writable view on the decoded audio.
    samples = np.frombuffer(buf, dtype="<f4").astype(np.float32, copy=False)
    finite = np.isfinite(samples)
    if not finite.all():
        # A few bad samples are repaired; a file that is mostly NaN or infinity is not audio,
        # and zeroing it would answer 200 with empty text.
        if finite.mean() < 0.5:
            raise UndecodableAudioError(
                "The file's audio samples are not numbers (NaN or infinity). " + _formats_hint(),
                detail=stderr,
            )
        np.nan_to_num(samples, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    """Make sure the child is gone and reaped (no zombie), whatever happened."""
    if proc.poll() is None:
        # poll() is None, so the pid is not reaped yet and cannot have been reused.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AttributeError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    if proc.stdout is not None:
        proc.stdout.close()
    proc.wait()


def _read_stderr(path: Path, input_path: Path) -> str:
    """The tail of FFmpeg's stderr, with our temp paths removed (they are nobody's business)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - _STDERR_KEEP, 0))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    text = text.replace(f"file:{input_path}", "input").replace(str(input_path), "input")
    # FFmpeg prefixes lines with "[in#0 @ 0x55...]"; the addresses only add noise.
    return re.sub(r" @ 0x[0-9a-f]+\]", "]", text).strip()


def _raise_for_failure(returncode: int, stderr: str) -> None:
    lowered = stderr.lower()
    if any(pattern in lowered for pattern in _NO_STREAM_PATTERNS):
        raise NoAudioStreamError(
            "The file contains no audio stream. " + _formats_hint(), detail=stderr
        )
    if returncode < 0:
        stderr = f"FFmpeg was killed by signal {-returncode}. {stderr}".strip()
    raise UndecodableAudioError(
        "Could not decode the file as audio; it may be corrupt or in an unsupported format. "
        + _formats_hint(),
        detail=stderr,
    )


def _stated_duration(ffmpeg: str, input_path: Path, deadline: float) -> float | None:
    """The container's own duration, for the too-long message. Probing reads headers only."""
    budget = min(deadline - time.monotonic(), 10.0)
    if budget <= 0:
        return None
    cmd = [ffmpeg, "-nostdin", "-hide_banner", *_input_args(input_path)]
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=budget,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):  # run() kills and reaps on timeout
        return None
    match = _DURATION_RE.search(result.stderr.decode("utf-8", "replace"))
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
