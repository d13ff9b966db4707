"""Long-form transcription with whisper-1's semantics: the per-request decoding loop.

openai-whisper's ``transcribe()`` is the reference: a seek pointer walks the audio in 30 s
windows, moved by the timestamp tokens the model emits; the previous text conditions the next
window; each window is decoded at temperature 0 and again at higher temperatures while its text
fails the compression-ratio or log-probability checks. Windows are submitted to a ``decode``
coroutine that takes a list of jobs: in the service that is the batching model service, so the
windows of many requests share forward passes. The windows of audio longer than one window are
decoded in slices of ``slice_tokens`` tokens, each a separate call, so that a long file never
holds a batch (and the short requests in it) for a whole window.
"""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from ..transcript import Segment, TokenLogprob, Transcription, Word
from ..vocabulary import Vocabulary
from ..wire import N_FRAMES, DecodeJob, DecodeResult
from .audio import SAMPLE_RATE
from .words import group_words

HOP_LENGTH = 160  # samples per mel frame
WINDOW_SAMPLES = N_FRAMES * HOP_LENGTH
INPUT_STRIDE = 2  # mel frames per timestamp step (3000 frames / 1500 positions)
# Peak amplitude below which a window is digital silence (-80 dBFS): Whisper hallucinates text
# there (" you", with no_speech_prob ~0.93 but avg_logprob ~-0.8, so its no-speech rule keeps it).
SILENCE_PEAK = 1e-4

DecodeFn = Callable[[list[DecodeJob]], Awaitable[list[DecodeResult]]]
FeaturesFn = Callable[[np.ndarray], np.ndarray]  # samples -> log-mel (a .features.LogMel)


class DecodeError(RuntimeError):
    """The model service could not decode a window."""


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # ISO code; None detects it from the first window
    task: str = "transcribe"
    prompt: str | None = None
    temperature: float = 0.0  # the fallback schedule starts here and rises by the increment
    temperature_increment: float = 0.2
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    prompt_reset_on_temperature: float = 0.5
    word_timestamps: bool = False
    slice_tokens: int | None = None  # step budget per decode call for audio over 30 s
    part_of_long_file: bool = False  # a chunk of a long file: sliced as if it were over 30 s
    # The chunked path (1 s): the last window decodes all its speech but for its last
    # min_tail_s (no <|endoftext|> after a timestamp before that), and a remainder shorter
    # than this after a window is not decoded.
    min_tail_s: float = 0.0

    @property
    def temperatures(self) -> list[float]:
        """openai-whisper's schedule: from the request's temperature up to 1.0 by the increment."""
        if self.temperature_increment <= 0:
            return [self.temperature]
        schedule = [self.temperature]
        while schedule[-1] + self.temperature_increment <= 1.0 + 1e-6:
            schedule.append(round(schedule[-1] + self.temperature_increment, 6))
        return schedule


@dataclass
class TranscriptionInfo:
    """Filled in as decoding goes: the language is known once the first window is decoded."""

    language: str | None = None
    language_probability: float = 1.0
    windows: int = 0
    fallbacks: int = 0  # windows decoded again at a higher temperature
    segments: list[Segment] = field(default_factory=list)


def window_features(features: FeaturesFn, window: np.ndarray, segment_size: int) -> np.ndarray:
    """The log-mel of a window whose audio fills ``segment_size`` frames, the rest zeros.

    openai-whisper's ``transcribe()`` (and faster-whisper) pad a short window's log-mel with
    zeros rather than computing the log-mel of silence; with the same input the model makes
    the same choices (on the English dev set it changed 14 of 29 base transcripts, for 2 fewer
    errors, and brought tiny.en's in line with faster-whisper's; docs/benchmarks.md).
    """
    mel = np.array(features(window), dtype=np.float32)
    mel[:, segment_size:] = 0.0
    return mel


def compression_ratio(text: str) -> float:
    """gzip-style (zlib) compression ratio of the text, as openai-whisper computes it."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True)
class SegmentDecoded:
    """A segment, as soon as its window is decoded (a stream's delta)."""

    segment: Segment


@dataclass(frozen=True)
class TranscriptionDone:
    """The whole transcription, last; with what the metrics count."""

    transcription: Transcription
    windows: int  # windows decoded (fallback attempts not counted)
    fallbacks: int  # windows decoded again at a higher temperature


TranscriptionEvent = SegmentDecoded | TranscriptionDone


async def transcribe_events(
    audio: np.ndarray,
    options: TranscribeOptions,
    decode: DecodeFn,
    vocab: Vocabulary,
    features: FeaturesFn,
) -> AsyncIterator[TranscriptionEvent]:
    """Yield each segment as its window is decoded, then :class:`TranscriptionDone`."""
    info = TranscriptionInfo()
    content_frames = len(audio) // HOP_LENGTH
    initial_prompt = vocab.encode(" " + options.prompt.strip()) if options.prompt else []
    context: list[int] = list(initial_prompt)
    prompt_reset_since = 0
    language = options.language if vocab.is_multilingual else "en"
    long = options.part_of_long_file or content_frames > N_FRAMES
    sliced = options.slice_tokens if long else None
    request_key = uuid.uuid4().hex
    min_tail = round(options.min_tail_s * SAMPLE_RATE / HOP_LENGTH)
    seek = 0
    while seek < content_frames:
        window = audio[seek * HOP_LENGTH : seek * HOP_LENGTH + WINDOW_SAMPLES]
        segment_size = min(N_FRAMES, content_frames - seek)
        if seek and segment_size < min_tail:
            break  # what the last window left open is too short to hold a word
        if not np.any(np.abs(window[: segment_size * HOP_LENGTH]) >= SILENCE_PEAK):
            seek += segment_size  # digital silence: skipped without decoding
            continue
        job = DecodeJob.for_window(
            await asyncio.to_thread(window_features, features, window, segment_size),
            prompt=context[prompt_reset_since:],
            language=language,
            task=options.task,
            word_timestamps=options.word_timestamps,
            num_frames=segment_size,
            max_steps=sliced,
            key=f"{request_key}:{seek}" if sliced else None,
            cover_until=(
                segment_size * HOP_LENGTH / SAMPLE_RATE - options.min_tail_s
                if options.min_tail_s and seek + segment_size == content_frames
                else None
            ),
        )
        result = await _decode_with_fallback(job, options, decode, vocab, info)
        info.windows += 1
        if language is None:
            language = result.language
            info.language, info.language_probability = language, result.language_probability

        if _is_silence(result, options):
            seek += segment_size
            continue
        segments, seek_step = _split_segments(result, vocab, seek, segment_size)
        if options.word_timestamps:
            _add_words(segments, result, vocab, language or "en", seek)
        seek += seek_step
        for segment in segments:
            if segment.start == segment.end or not segment.text.strip():
                continue
            segment.id = len(info.segments)
            info.segments.append(segment)
            context.extend(segment.tokens)
            yield SegmentDecoded(segment)
        if not options.condition_on_previous_text or (
            result.temperature > options.prompt_reset_on_temperature
        ):
            prompt_reset_since = len(context)
    yield TranscriptionDone(
        Transcription(
            text="".join(segment.text for segment in info.segments).strip(),
            segments=info.segments,
            language=info.language or language or "en",
            duration=len(audio) / SAMPLE_RATE,
            task=options.task,
            language_probability=info.language_probability,
        ),
        windows=info.windows,
        fallbacks=info.fallbacks,
    )


async def transcribe(
    audio: np.ndarray,
    options: TranscribeOptions,
    decode: DecodeFn,
    vocab: Vocabulary,
    features: FeaturesFn,
) -> TranscriptionDone:
    """The whole transcription at once (what the events end with)."""
    async for event in transcribe_events(audio, options, decode, vocab, features):
        if isinstance(event, TranscriptionDone):
            return event
    raise AssertionError("transcribe_events ended without TranscriptionDone")


async def _decode_with_fallback(
    job: DecodeJob,
    options: TranscribeOptions,
    decode: DecodeFn,
    vocab: Vocabulary,
    info: TranscriptionInfo,
) -> DecodeResult:
    """Decode at each temperature of the schedule until the text passes the checks."""
    result: DecodeResult | None = None
    temperatures = options.temperatures
    for attempt, temperature in enumerate(temperatures):
        last = attempt == len(temperatures) - 1
        result = await _decode_to_end(
            job.at_temperature(temperature),
            decode,
            None if last else lambda partial: _too_repetitive(partial, options, vocab),
        )
        if attempt:
            info.fallbacks += 1
        if job.language is None:  # keep the language detected on the first attempt
            job = job.in_language(result.language)
        if not _needs_fallback(result, options, vocab):
            break
    assert result is not None
    return result


async def _decode_to_end(
    job: DecodeJob, decode: DecodeFn, give_up: Callable[[DecodeResult], bool] | None = None
) -> DecodeResult:
    """Decode one window, resubmitting it with its tokens so far while it comes back unfinished.

    Later slices go without the features while the model service holds the window's encoder
    output; one it has evicted comes back ``evicted`` and is sent again with them. A slice
    for which ``give_up`` says yes is not resubmitted: a window that has begun to repeat
    itself fails the compression check at its end too, and ran to the 224-token limit in
    7 more slices (docs/benchmarks.md)."""
    (first,) = await decode([job])
    result, current = first, job
    while not result.error and not result.done:
        if not result.evicted and give_up is not None and give_up(result):
            break
        current = current.with_features_of(job) if result.evicted else current.resumed(result)
        (result,) = await decode([current])
    if result.error:
        raise DecodeError(result.error)
    return result.detected_with(first)


def _too_repetitive(result: DecodeResult, options: TranscribeOptions, vocab: Vocabulary) -> bool:
    threshold = options.compression_ratio_threshold
    return threshold is not None and compression_ratio(vocab.decode(result.tokens)) > threshold


def _needs_fallback(result: DecodeResult, options: TranscribeOptions, vocab: Vocabulary) -> bool:
    if _is_silence(result, options):
        return False  # silence: skipped, not decoded again
    too_repetitive = _too_repetitive(result, options, vocab)
    too_unlikely = options.logprob_threshold is not None and (
        result.avg_logprob < options.logprob_threshold
    )
    return too_repetitive or too_unlikely


def _is_silence(result: DecodeResult, options: TranscribeOptions) -> bool:
    if options.no_speech_threshold is None or result.no_speech_prob <= options.no_speech_threshold:
        return False
    return options.logprob_threshold is None or result.avg_logprob < options.logprob_threshold


def _split_segments(
    result: DecodeResult, vocab: Vocabulary, seek: int, segment_size: int
) -> tuple[list[Segment], int]:
    """Cut a window's tokens into segments at consecutive timestamp pairs; return them and how
    far to move the seek pointer (to the last complete segment, or past the whole window)."""
    tokens = result.tokens
    ts_begin = vocab.timestamp_begin
    offset = seek * HOP_LENGTH / SAMPLE_RATE
    is_ts = [t >= ts_begin for t in tokens]
    single_ending = is_ts[-2:] == [False, True]
    boundaries = [k for k in range(1, len(tokens)) if is_ts[k - 1] and is_ts[k]]
    window_text = vocab.decode(tokens)
    ratio = compression_ratio(window_text)
    content_end = offset + segment_size * HOP_LENGTH / SAMPLE_RATE

    def make(lo: int, hi: int, start: float, end: float) -> Segment:
        # a closing timestamp may lie past the end of the audio (a short last window)
        end = max(start, min(end, content_end))
        piece = tokens[lo:hi]
        return Segment(
            id=0,
            seek=seek,
            start=round(start, 3),
            end=round(end, 3),
            text=vocab.decode(piece),
            tokens=piece,
            temperature=result.temperature,
            avg_logprob=result.avg_logprob,
            compression_ratio=ratio,
            no_speech_prob=result.no_speech_prob,
            logprobs=_token_logprobs(vocab, piece, result.token_logprobs[lo:hi]),
        )

    if boundaries:
        cuts = boundaries + ([len(tokens)] if single_ending else [])
        segments, last = [], 0
        for cut in cuts:
            start = offset + (tokens[last] - ts_begin) * vocab.time_precision
            end = offset + (tokens[cut - 1] - ts_begin) * vocab.time_precision
            segments.append(make(last, cut, start, end))
            last = cut
        if single_ending:
            return segments, segment_size
        return segments, (tokens[last - 1] - ts_begin) * INPUT_STRIDE

    duration = segment_size * HOP_LENGTH / SAMPLE_RATE
    timestamps = [t for t in tokens if t >= ts_begin]
    if timestamps and timestamps[-1] != ts_begin:
        duration = (timestamps[-1] - ts_begin) * vocab.time_precision
    return [make(0, len(tokens), offset, offset + duration)], segment_size


def _token_logprobs(
    vocab: Vocabulary, tokens: list[int], logprobs: list[float]
) -> list[TokenLogprob]:
    """``include[]=logprobs``: each text token's text, log-probability and UTF-8 bytes (a
    result without per-token log-probabilities, e.g. a test's, gives none)."""
    return [
        TokenLogprob(text, logprob, list(text.encode()))
        for token, logprob in zip(tokens, logprobs, strict=False)
        if token < vocab.eot and (text := vocab.decode([token]))
    ]


def _add_words(
    segments: list[Segment], result: DecodeResult, vocab: Vocabulary, language: str, seek: int
) -> None:
    """Attach the window's words to its segments, in order, by their token counts."""
    text_tokens = [t for t in result.tokens if t < vocab.eot]
    if not text_tokens or not result.token_times:
        return
    offset = seek * HOP_LENGTH / SAMPLE_RATE
    words, counts = group_words(
        vocab, text_tokens, result.token_times, result.token_probs, language, offset
    )
    queue: list[tuple[Word, int]] = list(zip(words, counts, strict=True))
    for segment in segments:
        budget = sum(1 for t in segment.tokens if t < vocab.eot)
        while queue and budget > 0:
            word, count = queue.pop(0)
            segment.words.append(word)
            budget -= count
        if segment.words:  # openai-whisper: the words' times are the better segment bounds
            segment.start, segment.end = segment.words[0].start, segment.words[-1].end
    if queue and segments:
        segments[-1].words.extend(word for word, _ in queue)
