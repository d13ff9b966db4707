"""The VAD (server/vad.py): Silero's real weights through onnxruntime, on real speech and on
noise generated here (white and pink at several levels, mains hum with harmonics)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from support import EVAL_DIR, hum, pink, scaled, white

from bentowhisper.server.audio import decode_audio
from bentowhisper.server.vad import (
    MAX_GAIN,
    SAMPLE_RATE,
    TARGET_RMS,
    SpeechDetector,
    VadParams,
    detect_speech,
    normalize_loudness,
)

JFK = EVAL_DIR / "audio/en_misc/jfk.flac"
LONGFORM = EVAL_DIR / "audio/longform/ljspeech_LJ001-0001_to_0016.flac"


NOISES = {
    **{f"white{level}": white(60, level) for level in (-60, -40, -25, -15)},
    **{f"pink{level}": pink(60, level) for level in (-60, -40, -25, -15)},
    **{f"hum{hz}_{level}": hum(60, hz, level) for hz in (50, 60) for level in (-40, -20, -6)},
    "silence": np.zeros(60 * SAMPLE_RATE, np.float32),
}


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return decode_audio(JFK)


@pytest.fixture(scope="module")
def jfk_regions(jfk) -> list[tuple[int, int]]:
    return detect_speech(jfk).regions


def seconds(regions: list[tuple[int, int]]) -> list[tuple[float, float]]:
    return [(round(s / SAMPLE_RATE, 2), round(e / SAMPLE_RATE, 2)) for s, e in regions]


def test_speech_is_found_where_it_is(jfk, jfk_regions) -> None:
    # jfk.flac: four phrases over 11 s, with pauses of about half a second between them.
    assert 3 <= len(jfk_regions) <= 5, seconds(jfk_regions)
    first, last = jfk_regions[0], jfk_regions[-1]
    assert first[0] / SAMPLE_RATE < 0.5 and last[1] / SAMPLE_RATE > 10.5, seconds(jfk_regions)
    covered = sum(end - start for start, end in jfk_regions)
    assert 0.7 * len(jfk) < covered <= len(jfk)
    starts_and_ends = [x for region in jfk_regions for x in region]
    assert starts_and_ends == sorted(starts_and_ends)  # sorted and disjoint


@pytest.mark.parametrize("name", sorted(NOISES))
def test_noise_alone_has_no_speech(name: str) -> None:
    audio = NOISES[name]
    assert detect_speech(audio).regions == []
    assert detect_speech(normalize_loudness(audio)).regions == []  # what "auto" sees


def test_speech_in_noise_is_found_and_the_noise_is_not(jfk, jfk_regions) -> None:
    audio = np.concatenate([jfk, pink(90, -40)])
    regions = detect_speech(normalize_loudness(audio)).regions
    assert regions, "no speech found"
    assert regions[-1][1] <= len(jfk) + SAMPLE_RATE // 2, seconds(regions)
    assert regions[0][0] < SAMPLE_RATE // 2


def test_streaming_in_any_pieces_gives_the_whole_file_regions(jfk, jfk_regions) -> None:
    # A WebSocket session feeds frames of whatever size the client sends.
    rng = np.random.default_rng(1)
    detector = SpeechDetector()
    closed: list[tuple[int, int]] = []
    position, opened = 0, []
    while position < len(jfk):
        size = int(rng.integers(1, 4000))
        closed += detector.feed(jfk[position : position + size])
        position += size
        if detector.in_speech:
            opened.append(detector.speech_start)
    closed += detector.flush()
    assert closed == jfk_regions
    assert {start for start, _ in jfk_regions} <= set(opened)  # open regions were reported


def test_parameters_change_the_regions(jfk, jfk_regions) -> None:
    # A longer silence_duration bridges jfk's pauses; a longer prefix starts a region earlier.
    merged = detect_speech(jfk, VadParams(silence_duration_ms=1500)).regions
    assert len(merged) < len(jfk_regions)
    padded = detect_speech(jfk, VadParams(prefix_padding_ms=0)).regions
    assert padded[1][0] > jfk_regions[1][0]
    strict = detect_speech(jfk, VadParams(threshold=0.99)).regions
    covered = sum(e - s for s, e in strict)
    assert covered < sum(e - s for s, e in jfk_regions)


def loud_level(audio: np.ndarray) -> float:
    frames = audio[: len(audio) // 1600 * 1600].reshape(-1, 1600)
    return float(np.percentile(np.sqrt(np.mean(np.square(frames), axis=1)), 95))


def test_loudness_normalisation(jfk) -> None:
    quiet = scaled(jfk, -55)  # a quiet recording: raised by at most MAX_GAIN (+20 dB)
    gain = np.max(np.abs(normalize_loudness(quiet))) / np.max(np.abs(quiet))
    assert gain == pytest.approx(MAX_GAIN, rel=1e-3)
    for level in (-30, -3):  # a normal one is raised, a hot one lowered, never clipped
        normal = normalize_loudness(scaled(jfk, level))
        assert np.max(np.abs(normal)) <= 0.99 + 1e-6
        assert loud_level(normal) == pytest.approx(TARGET_RMS, rel=0.01) or (
            np.max(np.abs(normal)) == pytest.approx(0.99, rel=1e-4)  # limited by its peak
        )


def test_cost_per_minute_of_audio() -> None:
    """The figure docs/benchmarks.md quotes; bounded loosely, the machine is shared."""
    audio = decode_audio(LONGFORM)
    detect_speech(audio[:SAMPLE_RATE])  # load the session
    started = time.process_time()
    detect_speech(audio)
    cpu = time.process_time() - started
    ms_per_minute = cpu * 1000 / (len(audio) / SAMPLE_RATE / 60)
    print(f"VAD: {ms_per_minute:.0f} ms of CPU per minute of audio")
    assert ms_per_minute < 1500


def test_the_vad_does_not_import_torch() -> None:
    # The API process never loads torch; silero-vad's own helpers would.
    code = (
        "import sys, numpy as np\n"
        "from bentowhisper.server import vad\n"
        "vad.detect_speech(np.zeros(16000, np.float32))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
