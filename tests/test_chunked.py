"""Chunked transcription (server/chunked.py, ``chunking_strategy``) on the real embedded models
(tiny.en, and base for the long file, whose language probe needs a multilingual model).

The engine is driven in-process as in test_transcribe.py (its batcher shares decode calls
between the chunks in flight, as the service's adaptive batching does); noise is generated here
(test_vad.py). Each audio is transcribed once per module, in fixtures several tests read. The
same through `bentoml serve` and the openai SDK: test_chunked_server.py.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import jiwer
import numpy as np
import pytest
from openai.types.audio import TranscriptionVerbose
from support import (
    JFK,
    JFK_TEXT,
    LONGFORM,
    Batcher,
    english,
    hum,
    load_audio,
    load_profile_model,
    manifest,
    pink,
    scaled,
    speech_then,
    white,
    words,
)

from bentowhisper.config import load_settings
from bentowhisper.engine.loading import WhisperBundle
from bentowhisper.server import formats
from bentowhisper.server.chunked import (
    Chunk,
    Chunking,
    Lanes,
    Rounds,
    chunked_events,
    pack_chunks,
    resolve_chunking,
)
from bentowhisper.server.features import LogMel
from bentowhisper.server.longform import (
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    TranscribeOptions,
    TranscriptionDone,
    transcribe,
)
from bentowhisper.server.protocol import (
    BadRequest,
    ServerVadChunking,
    TranscriptionRequest,
    parse_form,
)
from bentowhisper.server.vad import FRAME, SpeechRegions, VadParams, detect_speech
from bentowhisper.server.vad import normalize_loudness as normalized
from bentowhisper.transcript import Segment, Transcription
from bentowhisper.vocabulary import load_vocabulary
from bentowhisper.wire import DecodeJob, DecodeResult

AUTO = Chunking(VadParams(), normalize=True)
LJ1, LJ2 = "audio/en_ljspeech/LJ001-0001.wav", "audio/en_ljspeech/LJ001-0002.wav"


# --------------------------------------------------------------------------------------------
# pure logic: packing, time mapping, the strategy


def regions_of(*spans: tuple[float, float], seconds: float = 200.0) -> SpeechRegions:
    regions = [(int(s * SAMPLE_RATE), int(e * SAMPLE_RATE)) for s, e in spans]
    return SpeechRegions(regions, np.ones(int(seconds * SAMPLE_RATE) // FRAME, np.float32), 0)


def test_regions_are_packed_into_windows_in_order() -> None:
    speech = regions_of((0, 10), (12, 22), (24, 29), (100, 120), (121, 135), (137, 138))
    chunks = pack_chunks(speech)
    # 25 s; a gap of 71 s; 20 s + 14 s would be 34 s
    assert [len(c.pieces) for c in chunks] == [3, 1, 2]
    assert all(c.n_samples <= WINDOW_SAMPLES for c in chunks)
    flat = [piece for chunk in chunks for piece in chunk.pieces]
    assert flat == speech.regions


def test_a_long_region_is_cut_at_its_quietest_frame() -> None:
    speech = regions_of((0, 70))
    pause = int(24.0 * SAMPLE_RATE) // FRAME
    speech.probs[pause] = 0.1  # a pause at 24 s, in the second half of the first window
    later = int(40.0 * SAMPLE_RATE) // FRAME
    speech.probs[later] = 0.05  # and at 40 s, in the second half of the window from 24 s
    chunks = pack_chunks(speech)
    cuts = [piece[0] for chunk in chunks for piece in chunk.pieces][1:]
    assert cuts == [pause * FRAME, later * FRAME]
    assert all(c.n_samples <= WINDOW_SAMPLES for c in chunks)
    assert sum(c.n_samples for c in chunks) == 70 * SAMPLE_RATE


def test_chunk_times_map_back_to_the_original() -> None:
    chunk = Chunk([(16000, 48000), (160000, 192000)])  # 1-3 s and 10-12 s
    assert chunk.to_original(0.0) == 1.0
    assert chunk.to_original(1.5) == 2.5
    assert chunk.to_original(2.0) == 10.0  # a start at the join belongs to the later piece
    assert chunk.to_original(2.0, end=True) == 3.0  # an end to the earlier one
    assert chunk.to_original(3.0) == 11.0
    assert chunk.to_original(9.0, end=True) == 12.0  # past the end: the last sample


def test_lanes_hold_a_long_files_extra_chunks_while_others_decode() -> None:
    """A long file's first unfinished chunk goes on; its other chunks wait while another
    request's call is in flight, and go on once it is answered."""

    async def main() -> list[str]:
        lanes, events, answer = Lanes(), [], asyncio.Event()

        async def model(jobs: list) -> list:
            events.append(jobs[0])
            await answer.wait()
            return jobs

        async def chunk(name: str, lead: bool) -> None:
            held = lanes.held(lambda: lead)
            await lanes.until_free(lambda: lead)
            events.append(f"{name}{' after waiting' if held else ''}")

        short = asyncio.ensure_future(lanes.first(model)(["short"]))
        await asyncio.sleep(0)
        chunks = [asyncio.ensure_future(chunk(n, n == "lead")) for n in ("lead", "extra")]
        await asyncio.sleep(0.05)
        answer.set()
        await asyncio.gather(short, *chunks)
        assert not lanes.held(lambda: False)  # nobody else: no wait
        return events

    assert asyncio.run(main()) == ["short", "lead", "extra after waiting"]


def test_rounds_send_the_chunks_calls_as_one() -> None:
    """Each round goes once every running chunk has called; one that leaves (done, or held
    by the lanes) lets the others go; callers that are all gone cancel their round."""

    async def main() -> tuple[list[list[str]], bool]:
        sent: list[list[str]] = []
        stuck = asyncio.Event()

        async def model(jobs: list) -> list:
            sent.append(list(jobs))
            if "stuck" in jobs:
                await stuck.wait()
            return [f"{job}!" for job in jobs]

        rounds = Rounds(model)
        for _ in range(3):
            rounds.join()
        a = asyncio.ensure_future(rounds.call(["a"]))
        b = asyncio.ensure_future(rounds.call(["b1", "b2"]))
        await asyncio.sleep(0.01)
        assert sent == []  # the third chunk has not called yet
        c = asyncio.ensure_future(rounds.call(["c"]))
        assert await asyncio.gather(a, b, c) == [["a!"], ["b1!", "b2!"], ["c!"]]
        a = asyncio.ensure_future(rounds.call(["a"]))
        await asyncio.sleep(0.01)
        rounds.leave()  # b's chunk ended
        rounds.leave()  # c's chunk waits elsewhere
        assert await a == ["a!"]
        waiter = asyncio.ensure_future(rounds.call(["stuck"]))
        await asyncio.sleep(0.01)
        (send,) = rounds._sends
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await asyncio.sleep(0)
        return sent, send.cancelled()

    sent, cancelled = asyncio.run(main())
    assert sent == [["a", "b1", "b2", "c"], ["a"], ["stuck"]]
    assert cancelled


def test_a_tail_under_a_second_is_not_decoded(converted_models_dir) -> None:
    """A window the model leaves open 0.5 s before the end of the audio: the sequential loop
    decodes the 0.5 s again, with ``min_tail_s`` (what chunks get) it stops there."""
    vocab = load_vocabulary(converted_models_dir / "tiny.en")
    text = vocab.encode(" Hello there.")
    open_at = vocab.timestamp_begin + round(14.0 / vocab.time_precision)
    audio = np.full(int(14.5 * SAMPLE_RATE), 0.1, np.float32)

    def run(min_tail_s: float) -> tuple[list[DecodeJob], Transcription]:
        jobs: list[DecodeJob] = []

        async def model(batch: list[DecodeJob]) -> list[DecodeResult]:
            jobs.extend(batch)
            tokens = [vocab.timestamp_begin, *text, open_at, open_at] if len(jobs) == 1 else []
            return [
                DecodeResult(
                    tokens=tokens,
                    avg_logprob=-0.1,
                    no_speech_prob=0.0,
                    language="en",
                    language_probability=1.0,
                    temperature=0.0,
                )
                for _ in batch
            ]

        options = TranscribeOptions(language="en", min_tail_s=min_tail_s)
        done = asyncio.run(
            transcribe(audio, options, model, vocab, lambda _: np.zeros((80, 3000), np.float32))
        )
        return jobs, done.transcription

    jobs, result = run(0.0)
    assert [job.num_frames for job in jobs] == [1450, 50]
    jobs, result_with_rule = run(1.0)
    assert [job.num_frames for job in jobs] == [1450]
    assert result_with_rule.text == result.text == "Hello there."


def test_strategy_and_setting() -> None:
    assert resolve_chunking(None, "auto") == AUTO
    assert resolve_chunking(None, "none") is None
    assert resolve_chunking("none", "auto") is None  # a request opts out of the setting
    assert resolve_chunking("auto", "none") == AUTO
    vad = ServerVadChunking(type="server_vad", threshold=0.7, silence_duration_ms=500)
    assert resolve_chunking(vad, "none") == Chunking(VadParams(0.7, 300, 500), normalize=False)
    with pytest.raises(ValueError, match="chunking"):
        load_settings({"BENTOWHISPER_CHUNKING": "sometimes"})
    assert load_settings({}).chunking == "auto"


def form(**fields: str) -> list[tuple[str, object]]:
    return [("model", "whisper-1"), *fields.items()]


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (form(chunking_strategy="auto"), "auto"),
        (form(chunking_strategy="none"), "none"),
        (
            form(chunking_strategy='{"type": "server_vad", "threshold": 0.6}'),
            ServerVadChunking(type="server_vad", threshold=0.6),
        ),
        (
            [
                ("model", "whisper-1"),
                ("chunking_strategy[type]", "server_vad"),
                ("chunking_strategy[prefix_padding_ms]", "100"),
                ("chunking_strategy[silence_duration_ms]", "800"),
            ],
            ServerVadChunking(type="server_vad", prefix_padding_ms=100, silence_duration_ms=800),
        ),
    ],
)
def test_chunking_strategy_forms(items, expected) -> None:
    request = parse_form(items)
    assert isinstance(request, TranscriptionRequest)
    assert request.chunking_strategy == expected


@pytest.mark.parametrize(
    "items",
    [
        form(chunking_strategy="sometimes"),
        form(chunking_strategy='{"type": "server_vad", "threshold": 1.5}'),
        form(chunking_strategy='{"type": "server_vad", "prefix_padding_ms": -1}'),
        form(chunking_strategy='{"type": "semantic_vad"}'),
        form(chunking_strategy='{"type": "server_vad"'),  # broken JSON
        [("model", "whisper-1"), ("chunking_strategy[silence_duration_ms]", "-5")],
        [
            ("model", "whisper-1"),
            ("chunking_strategy[type]", "server_vad"),
            ("chunking_strategy[threshold]", "high"),
        ],
    ],
)
def test_bad_chunking_strategy_is_a_400_with_param(items) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_form(items)
    error = raised.value.to_dict()["error"]
    assert error["param"] == "chunking_strategy"
    assert error["type"] == "invalid_request_error"
    assert raised.value.status_code == 400


# --------------------------------------------------------------------------------------------
# the real engine


@pytest.fixture(scope="module")
def base(converted_models_dir) -> WhisperBundle:
    """For the long file: its language probe needs a multilingual model."""
    return load_profile_model(converted_models_dir, "base")


@pytest.fixture(scope="module")
def tiny_en(converted_models_dir) -> WhisperBundle:
    """For the rest: what reaches the model is the VAD's, and tiny.en costs a fifth of base."""
    return load_profile_model(converted_models_dir, "tiny.en")


class Recorder:
    """The batcher, recording every call's jobs and how many were in flight at once."""

    def __init__(self, bundle: WhisperBundle) -> None:
        self.batcher = Batcher(bundle, settle=0.05)
        self.calls: list[list[DecodeJob]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, jobs: list[DecodeJob]) -> list[DecodeResult]:
        self.calls.append(jobs)
        self.in_flight += len(jobs)
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self.batcher(jobs)
        finally:
            self.in_flight -= len(jobs)


def chunked(
    bundle: WhisperBundle,
    audio: np.ndarray,
    chunking: Chunking = AUTO,
    max_in_flight: int = 4,
    **options: Any,
) -> tuple[Transcription, Recorder]:
    recorder = Recorder(bundle)
    opts = TranscribeOptions(slice_tokens=32, **options)

    async def main() -> Transcription:
        features = LogMel.from_checkpoint(bundle.checkpoint)
        events = chunked_events(
            audio, chunking, opts, recorder, bundle.vocab, features, max_in_flight
        )
        async for event in events:
            if isinstance(event, TranscriptionDone):
                return event.transcription
        raise AssertionError("no TranscriptionDone")

    return asyncio.run(main()), recorder


NOISY = {
    "pink-50": lambda: speech_then(pink, -50),
    "pink-40": lambda: speech_then(pink, -40),
    "pink-30": lambda: speech_then(pink, -30),
    "white-45": lambda: speech_then(white, -45),
    "white-35": lambda: speech_then(white, -35),
}
NOISE_ONLY = {
    "white-40": lambda: white(60, -40),
    "pink-25": lambda: pink(60, -25),
    "hum50-20": lambda: hum(60, 50, -20),
    "hum60-10": lambda: hum(60, 60, -10),
}


@pytest.fixture(scope="module")
def noisy_runs(tiny_en) -> dict[str, Transcription]:
    return {name: chunked(tiny_en, make())[0] for name, make in NOISY.items()}


@pytest.mark.parametrize("name", sorted(NOISY))
def test_no_words_from_noise_after_speech(noisy_runs, name: str) -> None:
    # Without VAD, 11 s of jfk then 90 s of low pink noise came back as the sentence 4 times.
    result = noisy_runs[name]
    jfk_seconds = len(load_audio(JFK)) / SAMPLE_RATE
    assert len(words(result.text)) <= len(words(JFK_TEXT)), result.text
    assert jiwer.wer(english(JFK_TEXT), english(result.text)) <= 0.1, result.text
    assert result.segments and result.segments[-1].end <= jfk_seconds + 1.0


@pytest.mark.parametrize("name", sorted(NOISE_ONLY))
def test_noise_alone_is_never_decoded(tiny_en, name: str) -> None:
    result, recorder = chunked(tiny_en, NOISE_ONLY[name]())
    assert result.text == "" and result.segments == []
    assert recorder.calls == []


@pytest.fixture(scope="module")
def gapped() -> tuple[np.ndarray, dict[str, float]]:
    """LJ001-0001, 40 s of pink noise, jfk, 20 s of digital silence, LJ001-0002: where each
    clip starts in the file."""
    parts = [load_audio(LJ1), pink(40, -40), load_audio(JFK)]
    parts += [np.zeros(20 * SAMPLE_RATE, np.float32), load_audio(LJ2)]
    starts = np.cumsum([0] + [len(p) for p in parts])[:-1] / SAMPLE_RATE
    return np.concatenate(parts), {"lj1": starts[0], "jfk": starts[2], "lj2": starts[4]}


@pytest.fixture(scope="module")
def gapped_run(tiny_en, gapped) -> tuple[Transcription, Recorder]:
    audio, _ = gapped
    return chunked(tiny_en, audio, word_timestamps=True, prompt="Printing. Americans.")


def inside(time: float, regions: list[tuple[int, int]]) -> bool:
    sample = time * SAMPLE_RATE
    return any(
        start - 0.02 * SAMPLE_RATE <= sample <= end + 0.02 * SAMPLE_RATE for start, end in regions
    )


def check_timestamps(segments: list[Segment], regions: list[tuple[int, int]]) -> None:
    times = [t for segment in segments for t in (segment.start, segment.end)]
    assert times == sorted(times), times
    for segment in segments:
        assert segment.start < segment.end
        assert inside(segment.start, regions) and inside(segment.end, regions), segment
        for word in segment.words:
            assert segment.start <= word.start <= word.end <= segment.end, (word, segment)
            assert inside(word.start, regions) and inside(word.end, regions), word


def test_times_of_a_chunked_file_match_the_audio(gapped, gapped_run) -> None:
    (audio, starts), (result, _) = gapped, gapped_run
    text = english(result.text)
    for phrase in ("printing in the only sense", "fellow americans", "comparatively modern"):
        assert phrase in text, result.text
    regions = detect_speech(normalized(audio)).regions
    check_timestamps(result.segments, regions)

    def start_of(phrase: str) -> float:
        return next(s.start for s in result.segments if english(s.text).startswith(phrase))

    for clip, path, phrase in (
        ("lj1", LJ1, "printing"),
        ("jfk", JFK, "and so my fellow americans"),
        ("lj2", LJ2, "in being comparatively modern"),
    ):
        # where the clip's speech starts, by the VAD without padding on the clip alone
        onset = detect_speech(load_audio(path), VadParams(prefix_padding_ms=0)).regions[0][0]
        expected = starts[clip] + onset / SAMPLE_RATE
        assert abs(start_of(phrase) - expected) <= 0.5, (clip, start_of(phrase), expected)
    assert result.duration == pytest.approx(len(audio) / SAMPLE_RATE)


def test_long_files_share_max_chunks_in_flight(tiny_en, gapped) -> None:
    """Two long files at once, each allowed 2 chunks in flight, with lanes that allow 2 in
    all: never more than 2 chunks at the model, and both files come out whole."""
    audio, _ = gapped
    recorder, lanes = Recorder(tiny_en), Lanes(long_chunks=2)
    features = LogMel.from_checkpoint(tiny_en.checkpoint)
    options = TranscribeOptions(slice_tokens=32, language="en")

    async def one() -> Transcription:
        events = chunked_events(audio, AUTO, options, recorder, tiny_en.vocab, features, 2, lanes)
        async for event in events:
            if isinstance(event, TranscriptionDone):
                return event.transcription
        raise AssertionError("no TranscriptionDone")

    async def main() -> list[Transcription]:
        return list(await asyncio.gather(one(), one()))

    first, second = asyncio.run(main())
    assert recorder.most_in_flight == 2  # 4 without the shared limit
    assert "fellow americans" in english(first.text) and english(second.text) == english(first.text)


def test_every_chunk_is_conditioned_on_the_prompt(tiny_en, gapped_run) -> None:
    _, recorder = gapped_run
    prompt = tiny_en.vocab.encode(" Printing. Americans.")
    jobs = [job for call in recorder.calls for job in call]
    assert len(jobs) >= 2 and all(job.prompt[: len(prompt)] == prompt for job in jobs)


CUE = re.compile(r"^(\d\d:\d\d:\d\d[,.]\d\d\d) --> (\d\d:\d\d:\d\d[,.]\d\d\d)$")


def cue_times(body: str) -> list[tuple[str, str]]:
    return [m.groups() for line in body.splitlines() if (m := CUE.match(line))]


def test_formats_of_a_chunked_file_are_valid(gapped_run) -> None:
    result, _ = gapped_run
    request = TranscriptionRequest(
        model="whisper-1",
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    body, _ = formats.render(result, request)
    verbose = TranscriptionVerbose.model_validate(body)
    assert verbose.segments and verbose.words
    assert [s.start for s in verbose.segments] == sorted(s.start for s in verbose.segments)
    assert [w.start for w in verbose.words] == sorted(w.start for w in verbose.words)
    for response_format, separator in (("srt", ","), ("vtt", ".")):
        request = TranscriptionRequest(model="whisper-1", response_format=response_format)
        text, _ = formats.render(result, request)
        cues = cue_times(text)
        assert len(cues) == len(result.segments)
        starts = [formats.timestamp(s.start, separator) for s in result.segments]
        assert [start for start, _ in cues] == starts
        assert all(start < end for start, end in cues)
    assert formats.render(result, TranscriptionRequest(model="x", response_format="vtt"))[
        0
    ].startswith("WEBVTT")


@pytest.fixture(scope="module")
def longform_run(base) -> tuple[Transcription, Recorder]:
    return chunked(base, load_audio(LONGFORM), max_in_flight=2)


def test_long_file_chunks_are_decoded_together(longform_run) -> None:
    result, recorder = longform_run
    (clip,) = [c for c in manifest().values() if c["path"] == LONGFORM]
    wer = jiwer.wer(english(clip["text"]), english(result.text))
    print(f"long-form chunked WER {wer:.3f}")
    assert wer <= 0.10, result.text  # what test_transcribe holds the sequential loop to
    regions = detect_speech(normalized(load_audio(LONGFORM))).regions
    check_timestamps(result.segments, regions)
    # The chunks were in flight together (shared batches), never more than max_in_flight,
    # each round as one call (Rounds).
    assert recorder.most_in_flight == 2
    assert max(recorder.batcher.sizes) == 2
    assert max(len(jobs) for jobs in recorder.calls) == 2
    assert len(recorder.calls) >= 1 + 4  # the language probe, then 4 chunks of 106 s
    # Sliced as the long-form loop's windows are, so that short requests never wait for a
    # whole chunk: every decoding call of a chunk asks for at most slice_tokens steps.
    steps = [job.max_steps for jobs in recorder.calls[1:] for job in jobs]
    assert set(steps) == {32}, steps
    # One window per chunk (cover_until): no window started at temperature 0 but each
    # chunk's first, where the model used to leave a chunk's last piece to a second one.
    starts = [j for jobs in recorder.calls[1:] for j in jobs if not j.resume and not j.temperature]
    assert len(starts) == len(pack_chunks(detect_speech(normalized(load_audio(LONGFORM)))))


def test_a_closed_stream_stops_decoding(tiny_en) -> None:
    """A client that leaves after the first segment: no further decode call is made."""
    recorder = Recorder(tiny_en)
    audio = load_audio(LONGFORM)

    async def main() -> tuple[int, int]:
        features = LogMel.from_checkpoint(tiny_en.checkpoint)
        segments = chunked_events(
            audio, AUTO, TranscribeOptions(slice_tokens=32), recorder, tiny_en.vocab, features, 2
        )
        await anext(segments)
        await segments.aclose()  # what StreamingResponse does when the client goes
        closed_at = len(recorder.calls)
        await asyncio.sleep(2.0)  # a task still running would call decode again meanwhile
        return closed_at, len(recorder.calls)

    closed_at, later = asyncio.run(main())
    assert later == closed_at
    assert recorder.in_flight == 0


def test_quiet_speech_is_found_with_auto_and_missed_without(tiny_en) -> None:
    quiet = scaled(load_audio(JFK), -70)  # below what Silero hears as is
    auto, _ = chunked(tiny_en, quiet)
    assert jiwer.wer(english(JFK_TEXT), english(auto.text)) <= 0.1, auto.text
    strict, _ = chunked(tiny_en, quiet, Chunking(VadParams(), normalize=False))
    assert len(words(strict.text)) < len(words(auto.text))
