"""The speaker encoder on real dev audio: resemblyzer's weights in our own module."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from support import EVAL_DIR

from bentowhisper.server.audio import decode_audio
from bentowhisper.wire import SPEAKER_DIM, SPEAKER_WINDOW, EmbedJob

CLIPS = {
    "LJ-a": "en_ljspeech/LJ001-0001.wav",
    "LJ-b": "en_ljspeech/LJ001-0003.wav",
    "1221-a": "en_librispeech/1221-135766-0001.wav",
    "1221-b": "en_librispeech/1221-135766-0002.wav",
    "1995": "en_librispeech/1995-1837-0001.wav",
    "jfk": "en_misc/jfk.flac",
}


@pytest.fixture(scope="module")
def encoder():
    from bentowhisper.engine.speakers import SpeakerEncoder

    return SpeakerEncoder()


def _job(path: str) -> EmbedJob:
    audio = decode_audio(EVAL_DIR / "audio" / path)
    return EmbedJob.for_audio(audio, list(range(0, len(audio) - SPEAKER_WINDOW, 8000)))


def test_loads_without_resemblyzers_imports() -> None:
    # resemblyzer's package imports librosa/webrtcvad/scipy, which are not installed; only its
    # weights file is read.
    code = (
        "import sys; from bentowhisper.engine.speakers import SpeakerEncoder; SpeakerEncoder(); "
        "bad = {'resemblyzer', 'librosa', 'webrtcvad', 'scipy'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_same_speaker_closer_than_different_speakers(encoder) -> None:
    jobs = {name: _job(path) for name, path in CLIPS.items()}
    results = encoder.embed(list(jobs.values()))
    means = {}
    for name, job, result in zip(jobs, jobs.values(), results, strict=True):
        windows = result.array()
        assert windows.shape == (len(job.starts), SPEAKER_DIM)
        np.testing.assert_allclose(np.linalg.norm(windows, axis=1), 1, atol=1e-5)
        mean = windows.mean(0)
        means[name] = mean / np.linalg.norm(mean)
    same = [means["LJ-a"] @ means["LJ-b"], means["1221-a"] @ means["1221-b"]]
    names = ["LJ-a", "1221-a", "1995", "jfk"]
    different = [means[a] @ means[b] for i, a in enumerate(names) for b in names[i + 1 :]]
    # Measured: same 0.96-0.97, different at most 0.66.
    assert min(same) > 0.9, same
    assert max(different) < 0.75, different


def test_batched_equals_alone(encoder) -> None:
    a, b = _job(CLIPS["LJ-a"]), _job(CLIPS["jfk"])
    together = encoder.embed([a, b])
    alone = encoder.embed([a])[0].array(), encoder.embed([b])[0].array()
    np.testing.assert_allclose(together[0].array(), alone[0], atol=1e-4)
    np.testing.assert_allclose(together[1].array(), alone[1], atol=1e-4)


def test_short_and_empty_jobs(encoder) -> None:
    audio = decode_audio(EVAL_DIR / "audio" / CLIPS["LJ-a"])[:8000]  # 0.5 s: one padded window
    short, empty = encoder.embed([EmbedJob.for_audio(audio, [0]), EmbedJob.for_audio(audio, [])])
    assert short.array().shape == (1, SPEAKER_DIM) and np.isfinite(short.array()).all()
    assert empty.array().shape == (0, SPEAKER_DIM)
