"""Diarization scoring: DER (collar 0.25 s) and cpWER, and the in-process evaluation on real audio.

DER is md-eval's, on a 10 ms grid: (missed + false alarm + speaker confusion) / reference speech,
with every reference boundary's +-collar excluded and overlapped reference speech scored (each
frame counts max(n_ref, n_hyp) - n_correct), under the one-to-one speaker mapping that
maximises the matched time. cpWER (concatenated minimum-permutation WER, CHiME-6): each
speaker's words joined, speakers matched by the permutation with the fewest word errors.

    python benchmarks/der.py             # mixtures, the AMI clip and the stereo file, in-process
    python benchmarks/der.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import mixtures
import numpy as np

if TYPE_CHECKING:
    from bentowhisper.engine.speakers import SpeakerEncoder
    from bentowhisper.wire import EmbedJob, EmbedResult

Turns = Sequence[tuple[float, float, str]]
STEP = 0.01


def read_rttm(path: Path) -> list[tuple[float, float, str]]:
    turns = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "SPEAKER":
            start, dur = float(parts[3]), float(parts[4])
            turns.append((start, start + dur, parts[7]))
    return turns


def _grid(turns: Turns, speakers: list[str], n: int) -> np.ndarray:
    grid = np.zeros((len(speakers), n), bool)
    for start, end, speaker in turns:
        grid[speakers.index(speaker), round(start / STEP) : round(end / STEP)] = True
    return grid


def best_mapping(overlap: np.ndarray) -> list[tuple[int, int]]:
    """The one-to-one (ref, hyp) pairs maximising the summed ``overlap`` (exhaustive: at most
    a handful of speakers on either side)."""
    n_ref, n_hyp = overlap.shape
    if n_ref == 0 or n_hyp == 0:
        return []
    best, best_pairs = -1.0, []
    if n_ref <= n_hyp:
        for perm in itertools.permutations(range(n_hyp), n_ref):
            score = overlap[np.arange(n_ref), list(perm)].sum()
            if score > best:
                best, best_pairs = score, list(zip(range(n_ref), perm, strict=True))
    else:
        for perm in itertools.permutations(range(n_ref), n_hyp):
            score = overlap[list(perm), np.arange(n_hyp)].sum()
            if score > best:
                best, best_pairs = score, list(zip(perm, range(n_hyp), strict=True))
    return best_pairs


def der(ref: Turns, hyp: Turns, collar: float = 0.25) -> dict[str, float]:
    """DER and its parts (seconds), scored outside ``collar`` seconds of every reference
    boundary."""
    end = max([e for _, e, _ in ref] + [e for _, e, _ in hyp] + [0.0])
    n = round(end / STEP) + 1
    ref_speakers = sorted({s for _, _, s in ref})
    hyp_speakers = sorted({s for _, _, s in hyp})
    r, h = _grid(ref, ref_speakers, n), _grid(hyp, hyp_speakers, n)
    scored = np.ones(n, bool)
    c = round(collar / STEP)
    for start, stop, _ in ref:
        for edge in (round(start / STEP), round(stop / STEP)):
            scored[max(0, edge - c) : edge + c] = False
    r, h = r[:, scored], h[:, scored]
    overlap = r.astype(np.int64) @ h.T.astype(np.int64)
    pairs = best_mapping(overlap)
    n_ref, n_hyp = r.sum(0), h.sum(0)
    correct = np.zeros(r.shape[1], np.int64)
    for i, j in pairs:
        correct += r[i] & h[j]
    total = n_ref.sum()
    miss = np.maximum(n_ref - n_hyp, 0).sum()
    fa = np.maximum(n_hyp - n_ref, 0).sum()
    confusion = (np.minimum(n_ref, n_hyp) - correct).sum()
    return {
        "der": float((miss + fa + confusion) / max(total, 1)),
        "miss_s": float(miss * STEP),
        "false_alarm_s": float(fa * STEP),
        "confusion_s": float(confusion * STEP),
        "scored_speech_s": float(total * STEP),
    }


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def cpwer(ref: dict[str, str], hyp: dict[str, str]) -> float:
    """Concatenated minimum-permutation WER: each reference speaker's words against one
    hypothesis speaker's (missing speakers on either side are empty)."""
    refs = [words(t) for t in ref.values()]
    hyps = [words(t) for t in hyp.values()]
    size = max(len(refs), len(hyps))
    refs += [[]] * (size - len(refs))
    hyps += [[]] * (size - len(hyps))
    cost = np.array([[edit_distance(r, h) for h in hyps] for r in refs])
    best = min(cost[np.arange(size), list(p)].sum() for p in itertools.permutations(range(size)))
    return float(best / max(1, sum(len(r) for r in refs)))


# --- the in-process evaluation ------------------------------------------------------------------


@functools.cache
def _encoder() -> SpeakerEncoder:
    from bentowhisper.engine.speakers import SpeakerEncoder as Encoder

    return Encoder()


def diarize_in_process(
    audio: np.ndarray, max_speakers: int = 8, known: dict[str, np.ndarray] | None = None
) -> list[tuple[float, float, str]]:
    """Hypothesis turns of ``audio`` from the server's diarization code and the encoder;
    ``known``: reference samples by name, which label the speakers they match."""
    from bentowhisper.server.diarize import (
        diarize,
        reference_job,
        speaker_labels,
        speech_regions,
    )

    encoder = _encoder()

    async def embed(jobs: list[EmbedJob]) -> list[EmbedResult]:
        return encoder.embed(jobs)

    result = asyncio.run(diarize(audio, speech_regions(audio), embed, max_speakers))
    known = known or {}
    refs = [r.array().mean(0) for r in encoder.embed([reference_job(a) for a in known.values()])]
    labels = speaker_labels(result.centroids, np.array(refs).reshape(-1, 256), list(known))
    return [(t.start, t.end, labels[t.speaker]) for t in result.turns]


def evaluate(count: int = 10, first_seed: int = 0) -> dict:
    rows = []
    for mix in mixtures.mixtures(count, first_seed):
        started = time.perf_counter()
        hyp = diarize_in_process(mix.audio)
        score = der(mix.turns, hyp)
        rows.append(
            {
                "name": mix.name,
                "seconds": len(mix.audio) / 16000,
                "speakers": len(mix.speakers),
                "found": len({s for _, _, s in hyp}),
                "elapsed_s": time.perf_counter() - started,
                **score,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    ami_path = mixtures.EVAL_DIR / "audio/multi_speaker/ami_ES2004a_750-810"
    ami_hyp = diarize_in_process(mixtures.load(ami_path.with_suffix(".wav")))
    ami_ref = read_rttm(ami_path.with_suffix(".rttm"))
    from bentowhisper.server.diarize import speech_regions

    left, right = mixtures.stereo_channels()
    stereo_ref = [(s, e, "left") for s, e in speech_regions(left)]
    stereo_ref += [(s, e, "right") for s, e in speech_regions(right)]
    stereo_hyp = diarize_in_process((left + right) / 2)
    summary: dict = {"mixtures": rows}
    for k in (2, 3, 4):
        group = [r for r in rows if r["speakers"] == k]
        summary[f"{k}_speakers"] = _aggregate(group)
    summary["all"] = _aggregate(rows)
    summary["ami"] = {**der(ami_ref, ami_hyp), "found": len({s for _, _, s in ami_hyp})}
    summary["stereo"] = {**der(stereo_ref, stereo_hyp), "found": len({s for *_, s in stereo_hyp})}
    return summary


def _aggregate(rows: list[dict]) -> dict:
    errors = sum(r["der"] * r["scored_speech_s"] for r in rows)
    speech = sum(r["scored_speech_s"] for r in rows)
    return {
        "mixtures": len(rows),
        "count_right": sum(r["found"] == r["speakers"] for r in rows) / max(1, len(rows)),
        "der": errors / max(speech, 1e-9),  # time-weighted, as md-eval over a corpus
        "audio_s": sum(r["seconds"] for r in rows),
        "elapsed_s": sum(r["elapsed_s"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10, help="mixtures per speaker count")
    parser.add_argument("--first-seed", type=int, default=0, help="10: the held-out mixtures")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    summary = evaluate(args.count, args.first_seed)
    for key in ("2_speakers", "3_speakers", "4_speakers", "all", "ami", "stereo"):
        print(key, json.dumps(summary[key]))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
