"""Chunked transcription (``chunking_strategy``): VAD speech regions decoded in parallel.

The sequential loop (:mod:`.longform`) cannot start a window before the previous one is
decoded, so one long file keeps a batch nearly empty. Here the speech regions that the VAD
finds are packed into chunks of at most 30 s (a region longer than that is cut at its quietest
frame), and all chunks of a file go to the batching model service at once, at most
``max_in_flight`` per request so that a file of hours holds a bounded number of windows'
features and model slots. Audio outside the regions is never decoded, so noise and silence
cannot come back as words. A chunk's speech regions are concatenated and run through the
long-form loop (so the request's ``prompt`` conditions every chunk, each window has the loop's
temperature fallback, and a tail the model leaves open is decoded again from its last
timestamp); its times (segments and words) are mapped back to the original audio. Segments
are yielded in order, each as soon as its chunk and those before it are decoded.

WhisperX, insanely-fast-whisper and faster-whisper's ``BatchedInferencePipeline`` work this
way; what it gives up is conditioning a chunk on the previous chunk's text.

The chunks of a file over 30 s are decoded in slices of ``slice_tokens``, as the long-form
loop's windows are, and through :class:`Lanes` they step aside for every other request.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import numpy as np

from ..config import Settings
from ..transcript import Segment, Transcription
from ..vocabulary import Vocabulary
from ..wire import DecodeJob, DecodeResult
from .longform import (
    HOP_LENGTH,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    DecodeFn,
    FeaturesFn,
    SegmentDecoded,
    TranscribeOptions,
    TranscriptionDone,
    TranscriptionEvent,
    transcribe,
    transcribe_events,
    window_features,
)
from .vad import FRAME, SpeechRegions, VadParams, detect_speech, normalize_loudness


class Lanes:
    """Short requests go before the extra chunks of long files.

    Two long files keep eight chunks at the model service, a whole batch, and a short request
    that came then waited behind them (its p95 6x idle before this, docs/benchmarks.md). While
    a decode call of any other request (a short file, a realtime turn) is in flight, each long
    file keeps only its first unfinished chunk going, and its other chunks wait at their next
    slice boundary. With long files alone, their chunks fill the batches as before.

    All long files together keep at most ``long_chunks`` chunks in flight (the setting
    ``max_chunks_in_flight``, a batch): one file fills a batch, two share it. Without that, two
    files' full-batch calls queued at the model service ahead of a short request's.
    """

    def __init__(self, long_chunks: int | None = None) -> None:
        self.others = 0  # decode calls in flight that are not a long file's chunks
        self._clear = asyncio.Event()
        self._clear.set()
        self.long_chunks = asyncio.Semaphore(long_chunks) if long_chunks else None

    def first(self, decode: DecodeFn) -> DecodeFn:
        """``decode`` for calls that long files' extra chunks make way for."""

        async def call(jobs: list[DecodeJob]) -> list[DecodeResult]:
            self.others += 1
            self._clear.clear()
            try:
                return await decode(jobs)
            finally:
                self.others -= 1
                if not self.others:
                    self._clear.set()

        return call

    def held(self, lead: Callable[[], bool]) -> bool:
        """Whether a long file's chunk waits now: unless ``lead()``, while others decode."""
        return self.others > 0 and not lead()

    async def until_free(self, lead: Callable[[], bool]) -> None:
        while self.held(lead):
            await self._clear.wait()


class Rounds:
    """The decode calls of a request's chunks, sent as one call per round.

    The chunks of a file decode in step: their slices come back together and are sent again a
    few milliseconds apart. BentoML's batcher hands the first call that reaches an idle model
    over alone, so every round ran as one row and then the rest (the 106 s file's 4 chunks as
    1 + 3, docs/benchmarks.md). Here a call waits until every chunk still running has made its
    call, then they go as one. A chunk that waits elsewhere (``leave`` ... ``join``, as
    :class:`Lanes` makes it) does not hold up the others.
    """

    def __init__(self, decode: DecodeFn) -> None:
        self.decode = decode
        self.running = 0  # chunks that will make another call
        self._pending: list[tuple[list[DecodeJob], asyncio.Future[list[DecodeResult]]]] = []
        self._sends: set[asyncio.Task[None]] = set()

    def join(self) -> None:
        self.running += 1

    def leave(self) -> None:
        self.running -= 1
        self._send_if_all_in()

    async def call(self, jobs: list[DecodeJob]) -> list[DecodeResult]:
        future: asyncio.Future[list[DecodeResult]] = asyncio.get_running_loop().create_future()
        self._pending.append((jobs, future))
        self._send_if_all_in()
        try:
            return await future
        except asyncio.CancelledError:
            # A call not yet sent is dropped; a round whose callers are all gone is cancelled.
            self._pending = [(j, f) for j, f in self._pending if f is not future]
            self._send_if_all_in()
            raise

    def _send_if_all_in(self) -> None:
        if self._pending and len(self._pending) >= self.running:
            round_, self._pending = self._pending, []
            send = asyncio.ensure_future(self._send(round_))
            self._sends.add(send)
            send.add_done_callback(self._sends.discard)

    async def _send(
        self, round_: list[tuple[list[DecodeJob], asyncio.Future[list[DecodeResult]]]]
    ) -> None:
        futures = [future for _, future in round_]

        def abandoned(_: object) -> None:
            if all(f.cancelled() for f in futures):
                send.cancel()

        send = asyncio.current_task()
        assert send is not None
        for future in futures:
            future.add_done_callback(abandoned)
        try:
            results = await self.decode([job for jobs, _ in round_ for job in jobs])
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, Exception):
                return  # handed to the callers
            raise
        for jobs, future in round_:
            if not future.done():
                future.set_result(results[: len(jobs)])
            results = results[len(jobs) :]


@dataclass(frozen=True)
class Chunking:
    """How a request is chunked: its VAD parameters, and whether loudness is normalised first
    (``"auto"``) or not (an explicit ``server_vad`` object)."""

    params: VadParams
    normalize: bool


def resolve_chunking(strategy: object, setting: str) -> Chunking | None:
    """A request's ``chunking_strategy`` (None when not sent) under the ``chunking`` setting;
    None means the sequential loop."""
    if strategy is None:
        strategy = setting
    if strategy == "none":
        return None
    if strategy == "auto":
        return Chunking(VadParams(), normalize=True)
    defaults = VadParams()
    return Chunking(
        VadParams(
            threshold=_given(strategy, "threshold", defaults.threshold),
            prefix_padding_ms=_given(strategy, "prefix_padding_ms", defaults.prefix_padding_ms),
            silence_duration_ms=_given(
                strategy, "silence_duration_ms", defaults.silence_duration_ms
            ),
        ),
        normalize=False,
    )


def request_events(
    audio: np.ndarray,
    strategy: object,
    options: TranscribeOptions,
    decode: DecodeFn,
    vocab: Vocabulary,
    features: FeaturesFn,
    settings: Settings,
    lanes: Lanes | None = None,
) -> AsyncIterator[TranscriptionEvent]:
    """A request's events: chunked, or from the sequential loop, as its ``chunking_strategy``
    (None when not sent) and the settings say. With ``lanes`` shared by the requests of a
    process, a chunked file over 30 s makes way for the others (:class:`Lanes`)."""
    chunking = resolve_chunking(strategy, settings.chunking)
    if chunking is None:
        return transcribe_events(
            audio, options, lanes.first(decode) if lanes is not None else decode, vocab, features
        )
    return chunked_events(
        audio, chunking, options, decode, vocab, features, settings.max_chunks_in_flight, lanes
    )


def _given(strategy: object, name: str, default: float) -> float:
    value = getattr(strategy, name, None)
    return default if value is None else value


@dataclass(frozen=True)
class Chunk:
    """One window's audio: ``pieces`` of the original (sample ranges), concatenated."""

    pieces: list[tuple[int, int]]

    @property
    def offsets(self) -> list[int]:
        """Where each piece starts in the chunk."""
        starts, total = [], 0
        for start, end in self.pieces:
            starts.append(total)
            total += end - start
        return starts

    @property
    def n_samples(self) -> int:
        return sum(end - start for start, end in self.pieces)

    def samples(self, audio: np.ndarray) -> np.ndarray:
        return np.concatenate([audio[start:end] for start, end in self.pieces])

    def to_original(self, seconds: float, *, end: bool = False) -> float:
        """A time in the chunk as a time in the original audio. At the join of two pieces a
        start belongs to the later piece and an end to the earlier one."""
        sample = seconds * SAMPLE_RATE
        offsets = self.offsets
        find = bisect.bisect_left if end else bisect.bisect_right
        k = max(find(offsets, sample) - 1, 0)
        start, stop = self.pieces[k]
        return round(min(start + sample - offsets[k], stop) / SAMPLE_RATE, 3)


MIN_TAIL_S = 1.0
# Regions further apart than this go to different chunks: a segment that spans the join of
# two pieces is shown over the gap between them (in srt/vtt), which should stay a pause.
MAX_JOIN_GAP_S = 3.0


def pack_chunks(speech: SpeechRegions, max_samples: int = WINDOW_SAMPLES) -> list[Chunk]:
    """Speech regions, in order, packed into chunks of at most ``max_samples``, joining only
    regions at most ``MAX_JOIN_GAP_S`` apart."""
    chunks: list[Chunk] = []
    current: list[tuple[int, int]] = []
    total = 0
    max_gap = MAX_JOIN_GAP_S * SAMPLE_RATE
    for region in speech.regions:
        for start, end in _cut_long(region, speech.probs, max_samples):
            if current and (total + end - start > max_samples or start - current[-1][1] > max_gap):
                chunks.append(Chunk(current))
                current, total = [], 0
            current.append((start, end))
            total += end - start
    if current:
        chunks.append(Chunk(current))
    return chunks


def _cut_long(
    region: tuple[int, int], probs: np.ndarray, max_samples: int
) -> list[tuple[int, int]]:
    """A region longer than a window, cut at its least speech-like frame in the second half
    of each window's span (a pause, if the speaker made one)."""
    start, end = region
    pieces = []
    while end - start > max_samples:
        first = -(-(start + max_samples // 2) // FRAME)
        last = (start + max_samples) // FRAME
        window = probs[first:last]
        cut = (first + int(np.argmin(window))) * FRAME if len(window) else start + max_samples
        cut = min(max(cut, start + 1), start + max_samples)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


async def chunked_events(
    audio: np.ndarray,
    chunking: Chunking,
    options: TranscribeOptions,
    decode: DecodeFn,
    vocab: Vocabulary,
    features: FeaturesFn,
    max_in_flight: int,
    lanes: Lanes | None = None,
) -> AsyncIterator[TranscriptionEvent]:
    """Each segment of ``audio`` in order, then :class:`.TranscriptionDone`, as the loop's.
    With ``lanes``, a file over 30 s keeps only its first unfinished chunk going while other
    requests decode, and a shorter one counts among those others."""
    duration = len(audio) / SAMPLE_RATE
    long_file = len(audio) > WINDOW_SAMPLES
    # A chunk is decoded in one window. The model may not end it on a segment it opened more
    # than MIN_TAIL_S before its end: it left the last piece's speech to a second window in
    # 9 of 10 chunks, a whole encoder pass after all the chunks. A remainder shorter than that
    # is the region's trailing silence, and with the chunk's text as prompt the model filled
    # 70 ms of it with 127 made-up tokens, three windows in a row (dropped as empty, but each
    # a decode call alone). whisper.cpp stops the same way with less than 1 s left.
    options = replace(options, min_tail_s=MIN_TAIL_S)
    if long_file:  # its chunks are sliced as its windows would be
        options = replace(options, part_of_long_file=True)
    elif lanes is not None:
        decode = lanes.first(decode)
    if chunking.normalize:
        audio = await asyncio.to_thread(normalize_loudness, audio)
    speech = await asyncio.to_thread(detect_speech, audio, chunking.params)
    chunks = pack_chunks(speech)
    slots = asyncio.Semaphore(max(1, max_in_flight))
    language, probability = options.language, 1.0
    if language is None and vocab.is_multilingual and len(chunks) > 1:
        # One decoder step on the first chunk detects the language for all of them.
        samples = chunks[0].samples(audio)
        size = len(samples) // HOP_LENGTH
        mel = await asyncio.to_thread(window_features, features, samples, size)
        prompt = vocab.encode(" " + options.prompt.strip()) if options.prompt else []
        probe = DecodeJob.for_window(
            mel, prompt=prompt, task=options.task, num_frames=size, max_steps=1
        )
        (detected,) = await decode([probe])
        language, probability = detected.language, detected.language_probability
        options = replace(options, language=language)

    rounds = Rounds(decode)

    async def run(index: int, chunk: Chunk) -> TranscriptionDone:
        def lead() -> bool:
            return all(task.done() for task in tasks[:index])

        async def call(jobs: list[DecodeJob]) -> list[DecodeResult]:
            if lanes is not None and long_file and lanes.held(lead):
                rounds.leave()
                try:
                    await lanes.until_free(lead)
                finally:
                    rounds.join()
            return await rounds.call(jobs)

        shared = lanes.long_chunks if lanes is not None and long_file else None
        async with slots, shared or contextlib.nullcontext():
            # a chunk's features exist only while it holds its slots
            rounds.join()
            try:
                return await _transcribe_chunk(audio, chunk, options, call, vocab, features)
            finally:
                rounds.leave()

    tasks = [asyncio.ensure_future(run(i, chunk)) for i, chunk in enumerate(chunks)]
    segments: list[Segment] = []
    windows = fallbacks = 0
    try:
        for task in tasks:
            done = await task
            windows += done.windows
            fallbacks += done.fallbacks
            if language is None:
                language = done.transcription.language
                probability = done.transcription.language_probability
            for segment in done.transcription.segments:
                segment.id = len(segments)
                segments.append(segment)
                yield SegmentDecoded(segment)
    finally:  # a client gone (or an error): no further chunk reaches the model
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    transcription = Transcription(
        text="".join(segment.text for segment in segments).strip(),
        segments=segments,
        language=language or ("en" if not vocab.is_multilingual else options.language or "en"),
        duration=duration,
        task=options.task,
        language_probability=probability,
    )
    yield TranscriptionDone(transcription, windows=windows, fallbacks=fallbacks)


async def _transcribe_chunk(
    audio: np.ndarray,
    chunk: Chunk,
    options: TranscribeOptions,
    decode: DecodeFn,
    vocab: Vocabulary,
    features: FeaturesFn,
) -> TranscriptionDone:
    """The long-form loop over one chunk (a tail the model leaves open is decoded again from
    its last timestamp, as in a long file), its times mapped back to the original audio."""
    samples = chunk.samples(audio)
    done = await transcribe(samples, options, decode, vocab, features)
    for segment in done.transcription.segments:
        segment.seek = round(chunk.to_original(segment.seek * HOP_LENGTH / SAMPLE_RATE) * 100)
        segment.start = chunk.to_original(segment.start)
        segment.end = chunk.to_original(segment.end, end=True)
        for word in segment.words:
            word.start = chunk.to_original(word.start)
            word.end = chunk.to_original(word.end, end=True)
    return done
