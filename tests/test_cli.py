"""The ``bentowhisper`` command line, run as a user runs it, on real audio and a real server.

``transcribe`` writes srt for the 106 s long-form dev clip in-process (with its progress bar),
reporting the bad files among its arguments and going on; ``transcribe --url`` sends jfk to
the suite's tiny.en server (``bentoml serve``; ``bentowhisper serve`` itself is started by
tests/test_instances.py) and must write the same file with the same words. Not always the same
bytes: on CPUs without bf16 the decoder runs dynamic int8 (engine/speed.py), whose activation
scale is taken over the whole batch, so a window's punctuation and cue breaks can depend on
what the server batched it with (seen on an AMD EPYC with the long-form clip: 2 words of 290
apart). tiny.en keeps the long decode short on 2 shared cores.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest
from support import EVAL_DIR, REPO_ROOT, free_port, reference
from whisper_normalizer.english import EnglishTextNormalizer

LONGFORM = EVAL_DIR / "audio/longform/ljspeech_LJ001-0001_to_0016.flac"
JFK = EVAL_DIR / "audio/en_misc/jfk.flac"
MODEL = "tiny.en"
CLI = [sys.executable, "-m", "bentowhisper.cli"]
SRT_CUE = re.compile(
    r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+?)\n\n", re.S
)

english = EnglishTextNormalizer()


def cli(
    *args: str | Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


@pytest.fixture(scope="module")
def cli_env(converted_models_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BENTOWHISPER_MODELS_DIR": str(converted_models_dir),
        "BENTOML_DO_NOT_TRACK": "true",
    }


@pytest.fixture(scope="module")
def local_srt(cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """``bentowhisper transcribe LONGFORM MISSING EMPTY JFK --format srt --model tiny.en
    --output-dir D``: two bad files between the good ones."""
    out = tmp_path_factory.mktemp("cli-local")
    missing, empty = out / "missing.wav", out / "empty.wav"
    empty.write_bytes(b"")
    done = cli(
        "transcribe",
        LONGFORM,
        missing,
        empty,
        JFK,
        "--format",
        "srt",
        "--model",
        MODEL,
        "--output-dir",
        out,
        env=cli_env,
    )
    return done, out


def test_transcribe_writes_srt_of_a_long_file_with_progress(local_srt) -> None:
    done, out = local_srt
    srt = (out / f"{LONGFORM.stem}.srt").read_text()
    cues = SRT_CUE.findall(srt)
    assert "".join(m.group(0) for m in SRT_CUE.finditer(srt)) == srt  # nothing but cues
    assert [int(cue[0]) for cue in cues] == list(range(1, len(cues) + 1))
    times = [(seconds(*cue[1:5]), seconds(*cue[5:9])) for cue in cues]
    assert all(start < end for start, end in times)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(times))
    assert len(cues) >= 5 and 100.0 <= times[-1][1] <= 106.6, times[-1]
    text = " ".join(cue[9] for cue in cues)
    wer = jiwer.wer(english(reference(LONGFORM.stem)), english(text))
    assert wer < 0.1, (wer, text)
    # The bar: updated as chunks finish (the 4 chunks decode together, so at least one state
    # between the start and the end), never backwards, complete at the end.
    states = re.findall(r"(\d+\.\d)/106\.5 s audio", done.stderr)
    assert states[-1] == "106.5" and len(set(states)) >= 3, done.stderr[-2000:]
    assert [float(state) for state in states] == sorted(float(state) for state in states)
    # The short clip gets no bar; both written files are named on stderr.
    assert "jfk.flac:" not in done.stderr
    assert str(out / "jfk.srt") in done.stderr and str(out / f"{LONGFORM.stem}.srt") in done.stderr


def test_transcribe_url_gives_what_the_engine_gives(
    local_srt, tiny_server, cli_env, tmp_path
) -> None:
    _, local = local_srt
    done = cli(
        "transcribe",
        JFK,
        "--format",
        "srt",
        "--model",
        MODEL,
        "--url",
        tiny_server.url,
        "--output-dir",
        tmp_path,
        env=cli_env,
    )
    assert done.returncode == 0, done.stderr
    # jfk alone: the long file's path through the server is tests/test_chunked_server.py's
    served, alone = ((d / "jfk.srt").read_text() for d in (tmp_path, local))
    if served != alone:  # the same words; see the module docstring
        served_text, alone_text = (
            english(" ".join(cue[9] for cue in SRT_CUE.findall(srt))) for srt in (served, alone)
        )
        assert jiwer.wer(alone_text, served_text) <= 0.03, (served, alone)


def test_transcribe_url_prints_json_to_stdout(tiny_server, cli_env) -> None:
    done = cli("transcribe", JFK, "--format", "json", "--url", tiny_server.url, env=cli_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('{"text":"And so my fellow Americans'), done.stdout
    assert "ask not what your country can do for you" in done.stdout.replace(",", "")
    assert done.stdout.endswith(',"usage":{"type":"duration","seconds":11}}\n'), done.stdout


def test_transcribe_reports_bad_files_and_goes_on(local_srt) -> None:
    done, out = local_srt
    missing, empty = out / "missing.wav", out / "empty.wav"
    assert done.returncode == 1, done.stderr
    assert f"bentowhisper: {missing}: " in done.stderr and "No such file" in done.stderr
    assert f"bentowhisper: {empty}: The audio file is empty" in done.stderr
    jfk = (out / "jfk.srt").read_text()  # the file after the bad ones
    assert "ask not what your country can do for you" in jfk.replace(",", ""), jfk


def test_transcribe_rejects_a_language_the_model_lacks(cli_env) -> None:
    done = cli("transcribe", JFK, "--model", MODEL, "--language", "German", env=cli_env)
    assert done.returncode == 1
    assert "'tiny.en' is English-only; --language de" in done.stderr
    unknown = cli("transcribe", JFK, "--language", "klingon", env=cli_env)
    assert unknown.returncode == 2 and "not a language Whisper knows" in unknown.stderr


def test_serve_fails_fast_on_a_bad_profile(cli_env, tmp_path) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text("model: base\nbatch_sizes: 8\n")
    done = cli("serve", "--config", profile, "--port", str(free_port()), env=cli_env, timeout=60)
    assert done.returncode != 0
    assert "unknown settings" in done.stderr and "batch_sizes" in done.stderr
