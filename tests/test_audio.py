"""Audio decoding: every advertised format, hostile inputs, limits, and no leftovers.

Real speech from the shared eval set (jfk.flac, 11 s stereo) is re-encoded with the same FFmpeg
the decoder uses, so each container/codec path is exercised without shipping binary fixtures.
"""

from __future__ import annotations

import math
import struct
import subprocess
import tempfile
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from support import ENCODINGS, EVAL_DIR

from bentowhisper.server import audio
from bentowhisper.server.audio import (
    SAMPLE_RATE,
    SUPPORTED_FORMATS,
    AudioDecodeError,
    AudioDecodeTimeoutError,
    AudioTooLongError,
    EmptyAudioError,
    FFmpegNotFoundError,
    NoAudioStreamError,
    UndecodableAudioError,
    decode_audio,
    duration_seconds,
    find_ffmpeg,
)

JFK = EVAL_DIR / "audio" / "en_misc" / "jfk.flac"
LONGFORM = EVAL_DIR / "audio" / "longform" / "ljspeech_LJ001-0001_to_0016.flac"
JFK_SECONDS = 11.0

needs_eval = pytest.mark.skipif(not JFK.exists(), reason=f"eval audio not found at {EVAL_DIR}")

# name -> (file name, FFmpeg output options). "mpga" is added as a copy of the mp3 bytes.
LOSSLESS = {"wav", "flac", "aiff"}


def _ffmpeg(*args: str) -> None:
    """Run the test-side FFmpeg (the same binary the decoder finds) and fail loudly."""
    cmd = [find_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    result = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, f"{cmd} failed: {result.stderr.decode(errors='replace')}"


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not JFK.exists():
        pytest.skip(f"eval audio not found at {EVAL_DIR}")
    out_dir = tmp_path_factory.mktemp("encoded")
    files: dict[str, Path] = {}
    for name, (file_name, options) in ENCODINGS.items():
        path = out_dir / file_name
        _ffmpeg("-i", str(JFK), "-vn", *options, str(path))
        files[name] = path
    files["mpga"] = out_dir / "jfk.mpga"
    files["mpga"].write_bytes(files["mp3"].read_bytes())
    return files


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The original FLAC, decoded: what every re-encoding should sound like."""
    if not JFK.exists():
        pytest.skip(f"eval audio not found at {EVAL_DIR}")
    return decode_audio(JFK)


@pytest.fixture
def isolated_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the decoder's temp dirs at an empty directory and check nothing is left behind.

    Isolated so that another decoder running at the same time (another test process) cannot
    make the check flaky. Also checks that no FFmpeg child is left (running or zombie).
    """
    tmp_root = tmp_path / "decoder-tmp"
    tmp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    assert tempfile.gettempdir() == str(tmp_root)
    yield tmp_root
    leftovers = list(tmp_root.glob(audio.TEMP_DIR_PREFIX + "*"))
    assert leftovers == [], f"decoder left temp files behind: {leftovers}"
    assert _ffmpeg_children() == []


def _ffmpeg_children() -> list[psutil.Process]:
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "ffmpeg" in child.name().lower():
                children.append(child)
        except psutil.NoSuchProcess:
            continue
    return children


def _best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 1600) -> float:
    """Peak normalised cross-correlation within ±max_lag samples (lossy codecs add delay)."""
    n = min(len(a), len(b))
    a = a[:n].astype(np.float64) - a[:n].mean()
    b = b[:n].astype(np.float64) - b[:n].mean()
    size = 1 << math.ceil(math.log2(2 * n))
    xc = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    lags = np.concatenate([xc[: max_lag + 1], xc[size - max_lag :]])
    return float(lags.max() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _write_wav_int16(path: Path, channels: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """channels: shape (n_channels, n_samples), floats in [-1, 1]."""
    interleaved = (np.clip(channels.T, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels.shape[0])
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(interleaved.tobytes())


def _float_wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """A mono IEEE-float WAV built by hand (the wave module only writes integer PCM)."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHHH", 3, 1, rate, rate * 4, 4, 32, 0)  # WAVE_FORMAT_IEEE_FLOAT
    fact = struct.pack("<I", len(samples))
    chunks = (
        b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"fact" + struct.pack("<I", len(fact)) + fact
        + b"data" + struct.pack("<I", len(data)) + data
    )  # fmt: skip
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


# --- every format -----------------------------------------------------------------------------


def test_supported_formats_constant() -> None:
    assert set(SUPPORTED_FORMATS) >= {"flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav"}
    assert {"webm", "opus", "oga", "aiff"} <= set(SUPPORTED_FORMATS)


@needs_eval
def test_reference_decode(reference: np.ndarray) -> None:
    assert reference.dtype == np.float32
    assert reference.ndim == 1
    assert reference.flags.c_contiguous and reference.flags.writeable
    assert duration_seconds(reference) == pytest.approx(JFK_SECONDS, abs=0.01)
    assert 0.01 < _rms(reference) < 0.5
    # Not clipped: jfk is loud stereo, and a 0.707*(L+R) downmix would peak at ~1.1 here.
    assert 0.5 < np.abs(reference).max() < 0.95


def test_m4a_fixtures_really_differ_in_moov_position(encoded: dict[str, Path]) -> None:
    """Guard the fixture: one m4a must have its index at the end (needs a seekable input)."""
    fast = encoded["m4a_faststart"].read_bytes()
    end = encoded["m4a_moov_at_end"].read_bytes()
    assert fast.index(b"moov") < fast.index(b"mdat")
    assert end.index(b"moov") > end.index(b"mdat")
    assert encoded["mp4"].read_bytes().index(b"moov") > encoded["mp4"].read_bytes().index(b"mdat")


@pytest.mark.parametrize("name", [*ENCODINGS, "mpga"])
@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes", "path"])
def test_decodes_every_format(
    name: str, as_bytes: bool, encoded: dict[str, Path], reference: np.ndarray
) -> None:
    path = encoded[name]
    samples = decode_audio(path.read_bytes() if as_bytes else path)
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert abs(duration_seconds(samples) - JFK_SECONDS) < 0.1
    assert np.isfinite(samples).all()
    assert np.abs(samples).max() <= 1.0
    assert _rms(samples) == pytest.approx(_rms(reference), rel=0.15)
    correlation = _best_correlation(samples, reference)
    assert correlation > (0.999 if name in LOSSLESS else 0.9), correlation


@pytest.mark.parametrize("name", ["m4a_moov_at_end", "mp3", "ogg", "wav"])
def test_misleading_name_decodes_the_same(
    name: str, encoded: dict[str, Path], tmp_path: Path
) -> None:
    """Detection is by content: a .txt name (or none) changes nothing."""
    expected = decode_audio(encoded[name])
    lying = tmp_path / "x.txt"
    lying.write_bytes(encoded[name].read_bytes())
    other_ext = tmp_path / ("x.wav" if name != "wav" else "x.mp3")
    other_ext.write_bytes(encoded[name].read_bytes())
    no_ext = tmp_path / "-starts-with-dash"
    no_ext.write_bytes(encoded[name].read_bytes())
    for data in (lying, str(lying), other_ext, no_ext, lying.read_bytes()):
        np.testing.assert_array_equal(decode_audio(data), expected)


@needs_eval
def test_original_eval_files_decode() -> None:
    """A few eval files as they are (ogg from FLEURS, wav, mono flac at 22.05 kHz)."""
    for path in [
        EVAL_DIR / "audio" / "fleurs_en" / "fleurs-en-000.ogg",
        EVAL_DIR / "audio" / "en_misc" / "vosk_test.wav",
    ]:
        samples = decode_audio(path)
        assert samples.dtype == np.float32 and samples.size > SAMPLE_RATE


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_without_audio(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("video") / "silent.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=duration=1:size=64x64:rate=10", "-an", str(path))
    return path.read_bytes()


def _bad_input(kind: str, video: bytes, local_mp4: Path) -> bytes:
    if kind == "random":
        return np.random.default_rng(1234).bytes(64 * 1024)
    if kind == "empty":
        return b""
    if kind == "video_without_audio":
        return video
    if kind == "text":
        return b"This is not audio.\nJust a plain text file, with a few lines.\n" * 20
    if kind == "dash_manifest_to_local_file":
        # A DASH manifest pointing at a file on the server must not be followed.
        return (
            b'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
            b'mediaPresentationDuration="PT11S" minBufferTime="PT1S" '
            b'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"><Period>'
            b'<AdaptationSet mimeType="audio/mp4"><Representation id="0" bandwidth="1">'
            b"<BaseURL>file://" + str(local_mp4).encode() + b"</BaseURL>"
            b"</Representation></AdaptationSet></Period></MPD>"
        )
    if kind == "hls_playlist":
        return b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/a.mp3\n"
    if kind == "ffconcat_to_local_file":
        return b"ffconcat version 1.0\nfile " + str(JFK).encode() + b"\n"
    raise AssertionError(kind)


BAD_INPUTS = {
    "random": UndecodableAudioError,
    "empty": EmptyAudioError,
    "video_without_audio": NoAudioStreamError,
    "text": AudioDecodeError,  # any subclass: some FFmpeg builds probe text as a "tty" video
    "dash_manifest_to_local_file": UndecodableAudioError,
    "hls_playlist": UndecodableAudioError,
    "ffconcat_to_local_file": UndecodableAudioError,
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes", "path"])
def test_bad_input_raises_typed_error_quickly_and_cleanly(
    kind: str,
    as_bytes: bool,
    video_without_audio: bytes,
    isolated_tmp: Path,
    tmp_path: Path,
) -> None:
    local_mp4 = tmp_path / "server-side-secret.mp4"
    if kind == "dash_manifest_to_local_file":
        # A real local mp4 for the manifest to point at: decoding it would be a data leak.
        _ffmpeg("-f", "lavfi", "-i", "sine=f=440:d=1", "-c:a", "aac", str(local_mp4))
    data = _bad_input(kind, video_without_audio, local_mp4)
    source: bytes | Path = data
    if not as_bytes:
        source = tmp_path / "upload.m4a"  # a plausible name must not help either
        source.write_bytes(data)
    started = time.monotonic()
    with pytest.raises(AudioDecodeError) as excinfo:
        decode_audio(source, timeout_s=30)
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert isinstance(excinfo.value, BAD_INPUTS[kind])
    assert isinstance(excinfo.value, ValueError)  # what the HTTP layer turns into a 400
    message = str(excinfo.value)
    assert "mp3" in message and "flac" in message and "webm" in message, message
    assert str(isolated_tmp) not in message and str(isolated_tmp) not in excinfo.value.detail


def test_empty_input_does_not_run_ffmpeg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_popen(*args: object, **kwargs: object) -> None:
        raise AssertionError("FFmpeg must not run for empty input")

    monkeypatch.setattr(audio.subprocess, "Popen", no_popen)
    for data in (b"", bytearray(), (tmp_path / "empty.wav")):
        if isinstance(data, Path):
            data.write_bytes(b"")
        with pytest.raises(EmptyAudioError) as excinfo:
            decode_audio(data)
        assert excinfo.value.reason == "empty"


def test_zero_samples_is_an_error(isolated_tmp: Path, tmp_path: Path) -> None:
    """A valid WAV header with no frames: readable, but nothing to transcribe."""
    path = tmp_path / "zero.wav"
    _write_wav_int16(path, np.zeros((1, 0)))
    with pytest.raises(EmptyAudioError) as excinfo:
        decode_audio(path)
    assert excinfo.value.reason == "no_samples"


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        decode_audio(tmp_path / "nope.wav")
    with pytest.raises(UndecodableAudioError):
        decode_audio(tmp_path)


def test_error_reasons_are_distinct() -> None:
    reasons = {
        cls.reason
        for cls in (
            UndecodableAudioError,
            EmptyAudioError,
            NoAudioStreamError,
            AudioTooLongError,
            AudioDecodeTimeoutError,
        )
    }
    assert len(reasons) == 5
    for cls in (AudioTooLongError, AudioDecodeTimeoutError, EmptyAudioError):
        assert issubclass(cls, AudioDecodeError) and issubclass(cls, ValueError)


# --- limits -----------------------------------------------------------------------------------


@needs_eval
def test_too_long(isolated_tmp: Path) -> None:
    started = time.monotonic()
    with pytest.raises(AudioTooLongError) as excinfo:
        decode_audio(JFK, max_seconds=5)
    assert time.monotonic() - started < 5
    error = excinfo.value
    assert error.reason == "too_long"
    assert error.limit_seconds == 5
    assert error.duration_seconds == pytest.approx(JFK_SECONDS, abs=0.1)
    assert "11.0 s" in str(error) and "5 s" in str(error)


@needs_eval
def test_too_long_from_bytes_without_stated_duration(
    isolated_tmp: Path, encoded: dict[str, Path]
) -> None:
    """Raw-ish streams may not state a duration; the error must still be raised."""
    with pytest.raises(AudioTooLongError) as excinfo:
        decode_audio(encoded["webm"].read_bytes(), max_seconds=2.5)
    duration = excinfo.value.duration_seconds
    assert duration is None or duration == pytest.approx(JFK_SECONDS, abs=0.2)
    assert "2.5 s" in str(excinfo.value)


@needs_eval
@pytest.mark.parametrize("limit", [JFK_SECONDS, JFK_SECONDS + 0.05, 20.0])
def test_within_limit(limit: float, encoded: dict[str, Path]) -> None:
    """At (or just over) the nominal length is fine, codec padding notwithstanding."""
    for name in ("wav", "mp3", "m4a_moov_at_end"):
        samples = decode_audio(encoded[name], max_seconds=limit)
        assert abs(duration_seconds(samples) - JFK_SECONDS) < 0.1


@pytest.mark.skipif(not LONGFORM.exists(), reason="longform eval audio not found")
def test_timeout_kills_ffmpeg(isolated_tmp: Path) -> None:
    started = time.monotonic()
    with pytest.raises(AudioDecodeTimeoutError) as excinfo:
        decode_audio(LONGFORM, timeout_s=0.01)
    assert time.monotonic() - started < 5
    assert excinfo.value.reason == "timeout"
    assert excinfo.value.timeout_s == 0.01
    # isolated_tmp then checks: no ffmpeg child (running or zombie), no temp dir.


@pytest.mark.skipif(not LONGFORM.exists(), reason="longform eval audio not found")
def test_longform_decodes_fully() -> None:
    samples = decode_audio(LONGFORM.read_bytes())
    assert 100 < duration_seconds(samples) < 110


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        decode_audio(b"x", timeout_s=0)
    with pytest.raises(ValueError, match="max_seconds"):
        decode_audio(b"x", max_seconds=-1)


# --- signal handling --------------------------------------------------------------------------


def test_stereo_is_downmixed(tmp_path: Path, isolated_tmp: Path) -> None:
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "left_only.wav"
    _write_wav_int16(path, np.stack([left, np.zeros_like(left)]))
    samples = decode_audio(path)
    assert len(samples) == len(t)
    assert _rms(samples) == pytest.approx(_rms(left) / 2, rel=0.03)
    assert np.abs(samples).max() == pytest.approx(0.25, rel=0.03)
    assert _best_correlation(samples, left, max_lag=0) > 0.999


def test_resampled_to_16k(tmp_path: Path) -> None:
    rate = 44100
    t = np.arange(3 * rate) / rate
    path = tmp_path / "sine44k.wav"
    _write_wav_int16(path, (0.3 * np.sin(2 * np.pi * 1000 * t))[None, :], rate=rate)
    samples = decode_audio(path)
    assert duration_seconds(samples) == pytest.approx(3.0, abs=0.01)
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(samples)
    assert peak_hz == pytest.approx(1000, abs=2)


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44100])
def test_nan_and_inf_are_removed(rate: int, isolated_tmp: Path) -> None:
    t = np.arange(rate) / rate
    signal = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    signal[100:110] = np.nan
    signal[5000] = np.inf
    signal[6000] = -np.inf
    signal[7000] = 3.0  # out of range
    samples = decode_audio(_float_wav_bytes(signal, rate))
    assert len(samples) == SAMPLE_RATE
    assert np.isfinite(samples).all()
    assert np.abs(samples).max() <= 1.0
    if rate == SAMPLE_RATE:  # no resampling: clean samples pass through untouched
        clean = np.isfinite(signal) & (np.abs(signal) <= 1)
        np.testing.assert_array_equal(samples[clean], signal[clean])
        assert samples[7000] == 1.0


def test_duration_seconds() -> None:
    assert duration_seconds(np.zeros(SAMPLE_RATE * 3, dtype=np.float32)) == 3.0
    assert duration_seconds(np.zeros(8000, dtype=np.float32)) == 0.5
    assert duration_seconds(np.zeros(0, dtype=np.float32)) == 0.0


# --- finding FFmpeg ---------------------------------------------------------------------------


def test_find_ffmpeg_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = find_ffmpeg()
    monkeypatch.setenv(audio.FFMPEG_ENV, real)
    assert find_ffmpeg() == real
    monkeypatch.setenv(audio.FFMPEG_ENV, str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(FFmpegNotFoundError):
        find_ffmpeg()
    with pytest.raises(FFmpegNotFoundError):
        decode_audio(b"RIFF")


def test_find_ffmpeg_falls_back_to_imageio(monkeypatch: pytest.MonkeyPatch) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    monkeypatch.delenv(audio.FFMPEG_ENV, raising=False)
    monkeypatch.setenv("PATH", "")
    assert find_ffmpeg() == imageio_ffmpeg.get_ffmpeg_exe()


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44100])
def test_a_file_of_nan_samples_is_undecodable(rate: int, isolated_tmp: Path) -> None:
    signal = np.full(rate, np.nan, dtype=np.float32)
    signal[::3] = np.inf
    with pytest.raises(UndecodableAudioError, match="not numbers"):
        decode_audio(_float_wav_bytes(signal, rate))
