"""Who spoke when, and which words each speaker said (numpy only; the encoder runs elsewhere).

Speech regions are cut into overlapping 1.6 s windows (:func:`embed_jobs`); the speaker encoder
turns each into a 256-d embedding; the embeddings are clustered by agglomerative clustering
on cosine similarity, which stops by itself when the closest clusters are no longer alike
(so the speaker count comes out of the audio), bounded by a maximum (:func:`cluster`); each
10 ms of speech takes the label of the nearest window centre, giving speaker turns
(:func:`turns`). Words then take the speaker of the turn they overlap most (:func:`assign_words`)
and segments are split where the speaker changes (:func:`split_segments`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import string
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..transcript import Segment, Word
from ..wire import SPEAKER_DIM, SPEAKER_WINDOW, EmbedJob, EmbedResult
from .audio import AudioDecodeError, decode_audio
from .protocol import BadRequest
from .vad import VadParams, detect_speech

SAMPLE_RATE = 16000
WINDOW_S = SPEAKER_WINDOW / SAMPLE_RATE  # 1.6 s
STEP_S = 0.4  # between window starts: each window's label decides the 0.4 s around its centre
MIN_REGION_S = 0.4  # shorter regions get no window of their own; they take the nearest label
WINDOWS_PER_JOB = 32  # windows per EmbedJob: about 14 s of audio, so jobs stay small
# Agglomerative clustering stops when the two closest clusters' average cosine similarity is
# below this. Between 1.6 s windows of the dev mixtures, one speaker's pairs have a median of
# 0.80 (5th percentile 0.60), different speakers' 0.46 (95th percentile 0.63); 0.63-0.68 all
# found the right count in >= 93 % of the tuning mixtures (docs/benchmarks.md, Diarization).
THRESHOLD = 0.65
MAX_CLUSTER_WINDOWS = 2000  # beyond this, cluster a subsample and assign the rest to centroids
# A cluster with fewer windows (1.6 s of speech, or 5 % of all) is folded into its nearest one:
# one speaker's odd windows (a laugh, a window across a change) are not another speaker.
MIN_SPEAKER_SHARE = 0.05
MIN_SPEAKER_WINDOWS = 4

# A known speaker's reference sample (OpenAI's limits) and how alike a found speaker must be to
# take its name: one speaker's multi-second embeddings sit at 0.96-0.97, different speakers' at
# most 0.66 on the dev clips (tests/test_speakers.py).
REFERENCE_MIN_S, REFERENCE_MAX_S = 2.0, 10.0
KNOWN_SPEAKER_MIN = 0.75

EmbedFn = Callable[[list[EmbedJob]], Awaitable[list[EmbedResult]]]


@dataclass
class Turn:
    start: float
    end: float
    speaker: int  # cluster index; 0 is the first to speak


@dataclass
class Windows:
    """Where the embedding windows sit: their jobs, and each window's centre in seconds."""

    jobs: list[EmbedJob]
    centers: np.ndarray  # seconds, one per window, in job order
    regions: list[tuple[float, float]]  # the speech regions that were windowed


@dataclass
class Diarization:
    turns: list[Turn]
    n_speakers: int
    centroids: np.ndarray  # (n_speakers, 256), L2-normalised
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # per window


def window_starts(length: int) -> list[int]:
    """Window starts (samples) covering a region of ``length`` samples, STEP_S apart; the last
    window ends at the region's end, so the tail is covered without mostly-padding windows."""
    step = int(STEP_S * SAMPLE_RATE)
    if length <= SPEAKER_WINDOW:
        return [0]
    starts = list(range(0, length - SPEAKER_WINDOW + 1, step))
    if starts[-1] + SPEAKER_WINDOW < length:
        starts.append(length - SPEAKER_WINDOW)
    return starts


# The server's VAD (Silero via onnxruntime) with little padding: padding would be non-speech
# given to a speaker (false alarm), and the windows need only the speech.
VAD_PARAMS = VadParams(threshold=0.5, prefix_padding_ms=30, silence_duration_ms=200)


def speech_regions(samples: np.ndarray) -> list[tuple[float, float]]:
    """Speech regions (seconds) of 16 kHz ``samples`` (CPU bound: call it from a thread)."""
    found = detect_speech(samples, VAD_PARAMS)
    return [(start / SAMPLE_RATE, end / SAMPLE_RATE) for start, end in found.regions]


def embed_jobs(samples: np.ndarray, regions: Sequence[tuple[float, float]]) -> Windows:
    """Cut ``regions`` (seconds) of 16 kHz ``samples`` into embedding windows, grouped in jobs
    that carry their audio once."""
    jobs: list[EmbedJob] = []
    centers: list[float] = []
    kept: list[tuple[float, float]] = []
    for start_s, end_s in regions:
        start, end = int(start_s * SAMPLE_RATE), min(int(end_s * SAMPLE_RATE), len(samples))
        if end - start < MIN_REGION_S * SAMPLE_RATE:
            continue
        kept.append((start_s, end_s))
        starts = window_starts(end - start)
        for i in range(0, len(starts), WINDOWS_PER_JOB):
            group = starts[i : i + WINDOWS_PER_JOB]
            lo, hi = group[0], min(group[-1] + SPEAKER_WINDOW, end - start)
            audio = samples[start + lo : start + hi]
            jobs.append(EmbedJob.for_audio(audio, [s - lo for s in group]))
            for s in group:
                covered = min(SPEAKER_WINDOW, end - start - s)  # a short region's real audio
                centers.append((start + s + covered / 2) / SAMPLE_RATE)
    return Windows(jobs, np.asarray(centers, dtype=np.float64), kept)


def cluster(
    embeddings: np.ndarray, max_speakers: int, threshold: float = THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (one per row) and L2-normalised centroids of ``embeddings``.

    Average-linkage agglomerative clustering on cosine similarity: merge the two most alike
    clusters until no pair is above ``threshold`` and at most ``max_speakers`` remain. Tiny
    clusters (a cough, a window straddling two speakers) are then folded into their nearest
    neighbour, and every window is reassigned to its nearest centroid once.
    """
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, int), np.zeros((0, embeddings.shape[1] if embeddings.ndim == 2 else 0))
    x = _normalize(embeddings.astype(np.float64))
    sample = x
    if n > MAX_CLUSTER_WINDOWS:  # O(n^2) memory: cluster an even subsample
        sample = x[np.linspace(0, n - 1, MAX_CLUSTER_WINDOWS).astype(int)]
    groups = _agglomerate(sample, max_speakers, threshold)
    centroids = _normalize(np.stack([sample[g].mean(0) for g in groups]))
    labels = np.argmax(x @ centroids.T, axis=1)
    # Fold clusters too small to be a speaker, smallest first, while more than one remains.
    while len(centroids) > 1:
        counts = np.bincount(labels, minlength=len(centroids))
        small = int(np.argmin(counts))
        if counts[small] >= max(MIN_SPEAKER_WINDOWS, MIN_SPEAKER_SHARE * n):
            break
        centroids = np.delete(centroids, small, axis=0)
        labels = np.argmax(x @ centroids.T, axis=1)
        centroids = _centroids(x, labels, len(centroids))
    return labels, centroids


def _agglomerate(x: np.ndarray, max_speakers: int, threshold: float) -> list[list[int]]:
    # Average linkage kept as sums: sim(A, B) = sum of pairwise similarities / (|A| |B|).
    # Each row caches its most similar cluster, so a merge costs O(n) instead of a rescan of
    # the whole n x n matrix (2000 windows: seconds, not minutes).
    n = len(x)
    rows = np.arange(n)
    sums = x @ x.T
    np.fill_diagonal(sums, -np.inf)
    avg = sums.copy()
    sizes = np.ones(n)
    alive = np.ones(n, bool)
    best = np.argmax(avg, axis=1)
    members = [[i] for i in range(n)]
    for remaining in range(n, 1, -1):
        row_best = avg[rows, best]
        a = int(np.argmax(row_best))
        b = int(best[a])
        if row_best[a] < threshold and remaining <= max_speakers:
            break
        sums[a] += sums[b]
        sums[:, a] = sums[a]
        sizes[a] += sizes[b]
        alive[b] = False
        avg[b, :] = avg[:, b] = -np.inf
        avg[a] = np.where(alive, sums[a] / (sizes[a] * sizes), -np.inf)
        avg[a, a] = -np.inf
        avg[:, a] = avg[a]
        members[a].extend(members[b])
        members[b] = []
        # A merged cluster is a weighted mean of its parts, never more alike to a third than
        # the closer part: only the rows that pointed at a or b need a rescan.
        stale = np.flatnonzero(alive & ((best == a) | (best == b)))
        best[stale] = np.argmax(avg[stale], axis=1)
        best[b] = b
    return [m for m in members if m]


def _centroids(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    return _normalize(np.stack([x[labels == i].mean(0) for i in range(k)]))


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def turns(
    centers: np.ndarray, labels: np.ndarray, regions: Sequence[tuple[float, float]]
) -> list[Turn]:
    """Speaker turns: within each region, each instant takes the label of the nearest window
    centre (so a change falls halfway between two windows)."""
    out: list[Turn] = []
    if len(centers) == 0:
        return out
    for start, end in regions:
        inside = np.flatnonzero((centers >= start) & (centers <= end))
        if len(inside) == 0:  # a region too short to window: its nearest window's label
            nearest = np.argmin(np.abs(centers - (start + end) / 2))
            out.append(Turn(start, end, int(labels[nearest])))
            continue
        at = start
        for i, j in itertools.pairwise(inside):
            if labels[i] != labels[j]:
                change = (centers[i] + centers[j]) / 2
                out.append(Turn(at, change, int(labels[i])))
                at = change
        out.append(Turn(at, end, int(labels[inside[-1]])))
    return _merge(out)


def _merge(items: list[Turn], gap: float = 0.3) -> list[Turn]:
    # Adjacent turns of one speaker across a short pause are one turn.
    merged: list[Turn] = []
    for turn in sorted(items, key=lambda t: t.start):
        last = merged[-1] if merged else None
        if last and last.speaker == turn.speaker and turn.start - last.end <= gap:
            last.end = max(last.end, turn.end)
        else:
            merged.append(Turn(turn.start, turn.end, turn.speaker))
    return merged


async def diarize(
    samples: np.ndarray,
    regions: Sequence[tuple[float, float]],
    embed: EmbedFn,
    max_speakers: int,
) -> Diarization:
    """Speaker turns of ``samples`` (16 kHz) over its speech ``regions`` (seconds)."""
    windows = embed_jobs(samples, regions)
    results = await embed(windows.jobs) if windows.jobs else []
    _raise_for_errors(results)
    # Clustering is seconds of numpy on a long file: off the event loop.
    return await asyncio.to_thread(
        _diarization, windows, [r.array() for r in results], max_speakers
    )


def _raise_for_errors(results: list[EmbedResult]) -> None:
    for result in results:
        if result.error:
            raise RuntimeError(f"speaker embedding failed: {result.error}")


def _diarization(windows: Windows, embeddings: list[np.ndarray], max_speakers: int) -> Diarization:
    if not embeddings:
        return Diarization([], 0, np.zeros((0, SPEAKER_DIM)))
    labels, centroids = cluster(np.concatenate(embeddings), max_speakers)
    # Number speakers by first appearance, so "A" is whoever speaks first.
    first = _first_seen(windows.centers, labels)
    labels = np.argsort(first)[labels]
    found = turns(windows.centers, labels, windows.regions)
    return Diarization(found, len(centroids), centroids[first], labels)


def _first_seen(centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    order = np.argsort(centers, kind="stable")
    seen: list[int] = []
    for label in labels[order]:
        if label not in seen:
            seen.append(int(label))
    return np.asarray(seen, dtype=int)


def speaker_names(n: int) -> list[str]:
    """OpenAI's default labels: A, B, ..., Z, then AA, AB, ..."""
    letters = string.ascii_uppercase
    names = []
    for i in range(n):
        name, k = "", i
        while True:
            name = letters[k % 26] + name
            k = k // 26 - 1
            if k < 0:
                break
        names.append(name)
    return names


def speaker_of(start: float, end: float, found: Sequence[Turn]) -> int | None:
    """The speaker whose turns overlap [start, end] most; with no overlap, the nearest turn's."""
    if not found:
        return None
    overlap: dict[int, float] = {}
    for turn in found:
        o = min(end, turn.end) - max(start, turn.start)
        if o > 0:
            overlap[turn.speaker] = overlap.get(turn.speaker, 0.0) + o
    if overlap:
        return max(overlap, key=lambda s: overlap[s])
    mid = (start + end) / 2
    nearest = min(found, key=lambda t: min(abs(mid - t.start), abs(mid - t.end)))
    return nearest.speaker


@dataclass
class SpeakerSegment:
    id: int
    start: float
    end: float
    text: str
    speaker: str


def split_segments(
    segments: Sequence[Segment], found: Sequence[Turn], names: Sequence[str]
) -> list[SpeakerSegment]:
    """Segments split where the speaker of their words changes (by word timestamps); a segment
    without words keeps its span and takes the speaker it overlaps most. ``names[i]`` labels
    speaker ``i``; with no turns at all (no speech found) everything is the first name."""
    out: list[SpeakerSegment] = []

    def add(start: float, end: float, text: str, speaker: int | None) -> None:
        label = names[speaker] if speaker is not None else (names[0] if names else "A")
        out.append(SpeakerSegment(len(out), start, end, text, label))

    for segment in segments:
        if not segment.words:
            add(
                segment.start,
                segment.end,
                segment.text,
                speaker_of(segment.start, segment.end, found),
            )
            continue
        run: list[Word] = []
        run_speaker: int | None = None
        for word in segment.words:
            speaker = speaker_of(word.start, word.end, found)
            if run and speaker != run_speaker:
                add(run[0].start, run[-1].end, "".join(w.word for w in run), run_speaker)
                run = []
            run.append(word)
            run_speaker = speaker
        add(run[0].start, run[-1].end, "".join(w.word for w in run), run_speaker)
    return out


def word_regions(words: Sequence[Word], gap: float = 0.3) -> list[tuple[float, float]]:
    """Speech regions from word timestamps: words closer than ``gap`` seconds joined."""
    regions: list[tuple[float, float]] = []
    for word in sorted(words, key=lambda w: w.start):
        if regions and word.start - regions[-1][1] <= gap:
            regions[-1] = (regions[-1][0], max(regions[-1][1], word.end))
        elif word.end > word.start:
            regions.append((word.start, word.end))
    return regions


def reference_audio(url: str, *, timeout_s: float = 60.0) -> np.ndarray:
    """A known speaker's sample from its data URL: 16 kHz mono, 2-10 s, else a 400."""
    payload = url[url.index(";base64,") + len(";base64,") :]  # checked by the request model
    try:
        data = base64.b64decode(payload, validate=False)
        samples = decode_audio(data, max_seconds=REFERENCE_MAX_S + 1, timeout_s=timeout_s)
    except (binascii.Error, AudioDecodeError) as exc:
        raise BadRequest(
            f"A known_speaker_references[] entry is not audio that can be decoded: {exc}",
            param="known_speaker_references",
        ) from exc
    seconds = len(samples) / SAMPLE_RATE
    if not REFERENCE_MIN_S <= seconds <= REFERENCE_MAX_S:
        raise BadRequest(
            f"Each known_speaker_references[] sample must be {REFERENCE_MIN_S:g} to "
            f"{REFERENCE_MAX_S:g} seconds long; got {seconds:.1f} s.",
            param="known_speaker_references",
        )
    return samples


def reference_job(samples: np.ndarray) -> EmbedJob:
    """All of a reference sample in windows; their mean embedding is the speaker's voice."""
    return EmbedJob.for_audio(samples, window_starts(len(samples)))


def speaker_labels(
    centroids: np.ndarray, references: np.ndarray, names: Sequence[str]
) -> list[str]:
    """A label per speaker (centroid): the name of the reference it matches (one speaker per
    name, the pairing with the highest total similarity, each pair at least KNOWN_SPEAKER_MIN
    alike), else the next of "A", "B", ... that is not a given name."""
    labels: list[str | None] = [None] * len(centroids)
    if len(names) and len(centroids):
        sim = cosine(centroids, references)
        k = min(len(centroids), len(names))
        best, best_pairs = -np.inf, []
        for speakers in itertools.permutations(range(len(centroids)), k):
            for refs in itertools.permutations(range(len(names)), k):
                pairs = [
                    (a, b)
                    for a, b in zip(speakers, refs, strict=True)
                    if sim[a, b] >= KNOWN_SPEAKER_MIN
                ]
                score = sum(sim[a, b] for a, b in pairs)
                if score > best:
                    best, best_pairs = score, pairs
        for speaker, ref in best_pairs:
            labels[speaker] = names[ref]
    letters = (n for n in speaker_names(len(centroids) + len(names)) if n not in names)
    return [label if label is not None else next(letters) for label in labels]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities between the rows of ``a`` and of ``b``."""
    return _normalize(np.atleast_2d(a)) @ _normalize(np.atleast_2d(b)).T


async def speaker_segments(
    samples: np.ndarray,
    segments: Sequence[Segment],
    embed: EmbedFn,
    *,
    max_speakers: int,
    known: dict[str, np.ndarray] | None = None,
) -> list[SpeakerSegment]:
    """A transcription's segments (with word timestamps) split and labelled by speaker: what a
    route runs for ``diarized_json`` once Whisper is done. ``known``: reference samples by name
    (:func:`reference_audio`), embedded in the same call as the windows."""
    known = known or {}
    regions = await asyncio.to_thread(speech_regions, samples)
    windows = embed_jobs(samples, regions)
    references = [reference_job(audio) for audio in known.values()]
    results = await embed(windows.jobs + references) if windows.jobs or references else []
    _raise_for_errors(results)
    embeddings = [r.array() for r in results[: len(windows.jobs)]]
    ref_vectors = np.array([r.array().mean(0) for r in results[len(windows.jobs) :]])
    result = await asyncio.to_thread(_diarization, windows, embeddings, max_speakers)
    names = speaker_labels(result.centroids, ref_vectors.reshape(-1, SPEAKER_DIM), list(known))
    return split_segments(segments, result.turns, names)
