"""The transcription engine end to end: real converted models on real speech.

``tiny.en`` and ``base`` are loaded once per module and every clip is transcribed once: the
results are cached in module-scoped fixtures that several tests read. Groups of clips are
transcribed concurrently through a small in-test batcher that puts the windows of all requests
in flight into shared :func:`decode_batch` calls, as the service's adaptive batching does, so
those tests also exercise cross-request batching.

Word error rates are computed after Whisper's text normalisers (English for English, the basic
one otherwise), as the eval set's README prescribes.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import jiwer
import numpy as np
import pytest
import torch
from support import (
    ENCODINGS,
    EVAL_DIR,
    JFK,
    JFK_TEXT,
    LONGFORM,
    PROFILE,
    Batcher,
    basic,
    english,
    ffmpeg,
    load_audio,
    load_profile_model,
    manifest,
    words,
)

from bentowhisper.engine.decoding import EncoderCache, _Rules, decode_batch, encode_prefix
from bentowhisper.engine.loading import WhisperBundle, load_whisper
from bentowhisper.server.audio import decode_audio
from bentowhisper.server.features import LogMel
from bentowhisper.server.longform import (
    HOP_LENGTH,
    SAMPLE_RATE,
    TranscribeOptions,
    TranscriptionDone,
    transcribe,
)
from bentowhisper.transcript import Transcription
from bentowhisper.wire import N_FRAMES, DecodeJob, DecodeResult

FLEURS_LANGUAGES = ("de", "fr", "es", "pt")

Run = tuple[Transcription, TranscriptionDone]


# --------------------------------------------------------------------------------------------
# helpers


def group(name: str) -> list[dict[str, Any]]:
    """The clips of one eval group: the folder under ``audio/`` holding them."""
    clips = [clip for clip in manifest().values() if clip["path"].split("/")[1] == name]
    assert clips, f"no clips of group {name!r} in {EVAL_DIR / 'manifest.jsonl'}"
    return clips


def transcribe_all(
    bundle: WhisperBundle,
    requests: list[tuple[np.ndarray, TranscribeOptions]],
    decode: Batcher | None = None,
) -> list[Run]:
    """Transcribe all requests concurrently (their windows batched together); for each the
    transcription and the :class:`TranscriptionDone` event it came in."""
    features = LogMel.from_checkpoint(bundle.checkpoint)
    decode = decode or Batcher(bundle, settle=0.25 if len(requests) > 1 else 0.0)

    async def one(audio: np.ndarray, options: TranscribeOptions) -> Run:
        done = await transcribe(audio, options, decode, bundle.vocab, features)
        return done.transcription, done

    async def main() -> list[Run]:
        return list(await asyncio.gather(*(one(audio, options) for audio, options in requests)))

    return asyncio.run(main())


def transcribe_one(bundle: WhisperBundle, audio: np.ndarray, **options: Any) -> Run:
    return transcribe_all(bundle, [(audio, TranscribeOptions(**options))])[0]


def transcribe_plain(bundle: WhisperBundle, audio: np.ndarray, **options: Any) -> Transcription:
    """Through :func:`transcribe` itself, one window at a time as in the brief's usage."""

    async def decode(jobs: list[DecodeJob]) -> list[DecodeResult]:
        return await asyncio.to_thread(decode_batch, bundle, jobs)

    features = LogMel.from_checkpoint(bundle.checkpoint)
    done = asyncio.run(
        transcribe(audio, TranscribeOptions(**options), decode, bundle.vocab, features)
    )
    return done.transcription


# --------------------------------------------------------------------------------------------
# models and cached results


@pytest.fixture(scope="module")
def tiny_en(converted_models_dir) -> WhisperBundle:
    return load_profile_model(converted_models_dir, "tiny.en")


@pytest.fixture(scope="module")
def base(converted_models_dir) -> WhisperBundle:
    return load_profile_model(converted_models_dir, "base")


def in_fp32(profile_model: WhisperBundle) -> WhisperBundle:
    """The model in fp32: where batched and sliced decoding give exactly the tokens of one call.
    In bf16 a batch's other rows or a slice's re-read tokens change the rounding, and a close
    call can go the other way (as with fp16 on GPUs); those runs are held to accuracy instead."""
    if profile_model.dtype == torch.float32:
        return profile_model  # the profile's dtype on a CPU without bf16 (and never int8 here)
    return load_whisper(
        profile_model.checkpoint,
        device="cpu",
        dtype="float32",
        attn_implementation=PROFILE.attn_implementation,
    )


@pytest.fixture(scope="module")
def base_fp32(base) -> WhisperBundle:
    return in_fp32(base)


@pytest.fixture(scope="module")
def tiny_en_fp32(tiny_en) -> WhisperBundle:
    return in_fp32(tiny_en)


@pytest.fixture(scope="module")
def models(tiny_en, base) -> dict[str, WhisperBundle]:
    return {"tiny.en": tiny_en, "base": base}


@pytest.fixture(scope="module")
def jfk_runs(models) -> dict[str, Run]:
    """jfk.flac with default options, per model."""
    return {name: transcribe_one(bundle, load_audio(JFK)) for name, bundle in models.items()}


@pytest.fixture(scope="module")
def jfk_word_runs(models) -> dict[str, Run]:
    """jfk.flac with word timestamps, per model."""
    audio = load_audio(JFK)
    return {
        name: transcribe_one(bundle, audio, word_timestamps=True) for name, bundle in models.items()
    }


@pytest.fixture(scope="module")
def librispeech_runs(base) -> list[tuple[dict[str, Any], Run]]:
    clips = group("en_librispeech")
    runs = transcribe_all(base, [(load_audio(c["path"]), TranscribeOptions()) for c in clips])
    return list(zip(clips, runs, strict=True))


@pytest.fixture(scope="module")
def longform_run(tiny_en) -> tuple[dict[str, Any], Run]:
    """The 106 s long-form clip with tiny.en (the long-form loop is the same for every model;
    base would take three times as long)."""
    (clip,) = group("longform")
    assert clip["path"] == LONGFORM
    return clip, transcribe_one(tiny_en, load_audio(clip["path"]))


@pytest.fixture(scope="module")
def detected_languages(base) -> dict[str, tuple[str, str, float]]:
    """The first 3 de/fr/es/pt FLEURS clips of each language, their first windows in one
    ``decode_batch`` call, one token each: (expected, detected, probability) per clip. A
    request's first window detects its language in the same call; the rest of the
    transcription is not needed for it. (All 20 clips: 20 of 20 right, each at 0.96 or more,
    on 2026-12-04.)"""
    features = LogMel.from_checkpoint(base.checkpoint)
    clips = [clip for language in FLEURS_LANGUAGES for clip in group(f"fleurs_{language}")[:3]]
    jobs = [
        DecodeJob.for_window(
            features(load_audio(clip["path"])[: N_FRAMES * HOP_LENGTH]), max_steps=1
        )
        for clip in clips
    ]
    results = decode_batch(base, jobs)
    assert all(result.error is None for result in results), [r.error for r in results]
    return {
        clip["id"]: (clip["language"], result.language, result.language_probability)
        for clip, result in zip(clips, results, strict=True)
    }


@pytest.fixture(scope="module")
def fleurs_runs(base) -> dict[tuple[str, str], tuple[dict[str, Any], Run]]:
    """Three FLEURS clips transcribed with language detection (key ``("detect", id)``), and
    with a forced language or as a translation, all concurrently in shared batches."""
    clips = manifest()
    requests: list[tuple[str, str, TranscribeOptions]] = [
        ("detect", clip_id, TranscribeOptions())
        for clip_id in ("fleurs-de-000", "fleurs-es-002", "fleurs-de-004")
    ]
    requests += [
        ("force-fr", "fleurs-es-002", TranscribeOptions(language="fr")),
        ("force-de", "fleurs-de-000", TranscribeOptions(language="de")),
        ("translate", "fleurs-de-004", TranscribeOptions(task="translate")),
    ]
    runs = transcribe_all(
        base, [(load_audio(clips[clip_id]["path"]), options) for _, clip_id, options in requests]
    )
    return {
        (kind, clip_id): (clips[clip_id], run)
        for (kind, clip_id, _), run in zip(requests, runs, strict=True)
    }


# --------------------------------------------------------------------------------------------
# accuracy


@pytest.mark.parametrize("model", ["tiny.en", "base"])
def test_jfk_word_for_word(jfk_runs, model):
    result, _ = jfk_runs[model]
    assert result.language == "en"
    assert english(result.text) == english(JFK_TEXT), result.text
    assert jiwer.wer(english(JFK_TEXT), english(result.text)) == 0.0


def test_librispeech_wer_with_base(librispeech_runs):
    assert len(librispeech_runs) == 5
    references = [english(clip["text"]) for clip, _ in librispeech_runs]
    hypotheses = [english(result.text) for _, (result, _) in librispeech_runs]
    wer = jiwer.wer(references, hypotheses)
    per_clip = {
        clip["id"]: round(jiwer.wer(ref, hyp), 3)
        for (clip, _), ref, hyp in zip(librispeech_runs, references, hypotheses, strict=True)
    }
    assert wer <= 0.10, f"aggregate WER {wer:.3f}; per clip {per_clip}"


def test_language_detection_with_base(detected_languages):
    detected = detected_languages
    assert len(detected) == 12
    assert {expected for expected, _, _ in detected.values()} == set(FLEURS_LANGUAGES)
    correct = sum(expected == got for expected, got, _ in detected.values())
    assert correct >= 11, f"{correct}/12 detected: {detected}"
    assert all(0.0 < probability <= 1.0 for _, _, probability in detected.values())


def test_forcing_a_language(fleurs_runs, detected_languages):
    # the language of the first window decides; a forced one is used as given
    _, (detected, _) = fleurs_runs["detect", "fleurs-de-000"]
    _, (forced, _) = fleurs_runs["force-de", "fleurs-de-000"]
    assert detected.language == forced.language == "de"
    assert detected_languages["fleurs-de-000"][1] == "de"  # one call's detection, as in a run
    assert forced.text == detected.text

    # a Spanish clip forced to French comes out in French
    _, (spanish, _) = fleurs_runs["detect", "fleurs-es-002"]
    _, (french, _) = fleurs_runs["force-fr", "fleurs-es-002"]
    assert spanish.language == "es"
    assert french.language == "fr"
    assert basic(french.text) != basic(spanish.text)
    french_only = {"il", "ils", "ne", "pas", "qui", "à", "les", "des", "est", "et", "du", "au"}
    in_french = [w for w in words(french.text) if w in french_only]
    in_spanish = [w for w in words(spanish.text) if w in french_only]
    assert len(in_french) >= 3 and len(in_french) > len(in_spanish), (french.text, spanish.text)


def test_translate_german_to_english(fleurs_runs):
    _, (german, _) = fleurs_runs["detect", "fleurs-de-004"]
    _, (translated, _) = fleurs_runs["translate", "fleurs-de-004"]
    assert translated.task == "translate"
    assert translated.language == german.language == "de"  # the language spoken
    english_words = words(translated.text)
    assert len(english_words) >= 8, translated.text
    function_words = {"the", "of", "and", "is", "to", "a", "in", "on", "from", "it", "that"}
    german_words = {"der", "die", "das", "und", "ist", "von", "sich", "auf", "ein", "eine", "den"}
    assert len(function_words & set(english_words)) >= 4, translated.text
    assert not german_words & set(english_words), translated.text
    # not the German transcript: few words in common (names and numbers at most)
    shared = set(english_words) & set(words(german.text))
    assert len(shared) <= 0.2 * len(set(english_words)), (shared, translated.text, german.text)


def test_longform_no_window_dropped_or_repeated(longform_run):
    clip, (result, info) = longform_run
    duration = len(load_audio(clip["path"])) / SAMPLE_RATE
    assert duration > 100
    assert info.windows >= 4  # 30 s windows over 106 s of speech
    wer = jiwer.wer(english(clip["text"]), english(result.text))
    assert wer <= 0.10, f"WER {wer:.3f}: {result.text}"
    segments = result.segments
    starts = [segment.start for segment in segments]
    assert starts == sorted(starts)
    texts = [basic(segment.text) for segment in segments]
    assert all(a != b for a, b in itertools.pairwise(texts)), texts
    # no stretch of the (continuous) speech without a segment
    gaps = [b.start - a.end for a, b in itertools.pairwise(segments)]
    assert max(gaps) < 5.0, gaps
    assert segments[0].start < 2.0
    assert duration - 10.0 <= segments[-1].end <= duration + 0.01


# --------------------------------------------------------------------------------------------
# verbose_json values


def verbose_runs(
    jfk_runs, librispeech_runs, longform_run
) -> Iterator[tuple[str, str, Transcription, float]]:
    for model, (result, _) in jfk_runs.items():
        yield f"jfk/{model}", model, result, len(load_audio(JFK)) / SAMPLE_RATE
    runs = [(clip, run, "base") for clip, run in librispeech_runs] + [(*longform_run, "tiny.en")]
    for clip, (result, _), model in runs:
        duration = len(load_audio(clip["path"])) / SAMPLE_RATE
        yield f"{clip['id']}/{model}", model, result, duration


def test_verbose_values_are_real(models, jfk_runs, librispeech_runs, longform_run):
    for name, model, result, duration in verbose_runs(jfk_runs, librispeech_runs, longform_run):
        vocab = models[model].vocab
        segments = result.segments
        assert segments, name
        assert result.duration == pytest.approx(duration)
        assert result.text == "".join(segment.text for segment in segments).strip()
        assert [segment.id for segment in segments] == list(range(len(segments))), name
        previous = None
        for segment in segments:
            where = f"{name} segment {segment.id}: {segment}"
            assert segment.text.strip(), where
            assert vocab.decode(segment.tokens) == segment.text, where
            assert segment.tokens[0] >= vocab.timestamp_begin, where  # starts at a timestamp
            assert all(token < vocab.timestamp_begin + 1501 for token in segment.tokens), where
            assert np.isfinite(segment.avg_logprob) and segment.avg_logprob < 0.0, where
            assert segment.compression_ratio > 0.0, where
            assert 0.0 <= segment.no_speech_prob <= 1.0, where
            assert segment.temperature in TranscribeOptions().temperatures, where
            assert 0.0 <= segment.start < segment.end <= duration + 0.01, where
            # seek: mel frames (100 a second) where the segment's 30 s window starts
            assert isinstance(segment.seek, int), where
            assert 0 <= segment.seek <= segment.start * 100 + 1, where
            assert segment.end * 100 <= segment.seek + N_FRAMES + 1, where
            if previous is not None:
                assert segment.seek >= previous.seek, where
                assert segment.start >= previous.end - 0.01, where
                if segment.seek == previous.seek:  # one window: the same window values
                    assert segment.avg_logprob == previous.avg_logprob, where
                    assert segment.no_speech_prob == previous.no_speech_prob, where
            previous = segment


# --------------------------------------------------------------------------------------------
# word timestamps


@pytest.mark.parametrize("model", ["tiny.en", "base"])
def test_word_timestamps_on_jfk(jfk_word_runs, model):
    result, _ = jfk_word_runs[model]
    assert english(result.text) == english(JFK_TEXT)
    all_words = result.words
    assert len(all_words) == len(JFK_TEXT.split())
    for segment in result.segments:
        assert segment.words, segment
        joined = "".join(word.word for word in segment.words)
        assert re.sub(r"\s", "", joined) == re.sub(r"\s", "", segment.text), segment
        for word in segment.words:
            assert segment.start - 0.1 <= word.start <= word.end <= segment.end + 0.1, word
    for word in all_words:
        assert 0.0 <= word.start <= word.end <= 11.0 + 0.01, word
        assert word.end - word.start <= 3.0, word
        assert 0.0 <= word.probability <= 1.0, word
    for earlier, later in itertools.pairwise(all_words):
        assert later.start >= earlier.end - 0.01, (earlier, later)
    first, last = all_words[0], all_words[-1]
    assert first.word.strip() == "And" and first.start <= 1.0, first
    # the final period is the model's choice (tiny.en leaves it out)
    assert last.word.strip().rstrip(".") == "country" and 9.5 <= last.end <= 11.01, last
    # "fellow" comes well before "country." and after "And"
    fellow = next(word for word in all_words if word.word.strip() == "fellow")
    assert 0.5 <= fellow.start <= 2.5, fellow


# --------------------------------------------------------------------------------------------
# temperature fallback


def test_default_thresholds_keep_temperature_zero(jfk_runs):
    for model, (result, info) in jfk_runs.items():
        assert info.fallbacks == 0, model
        assert result.segments and all(s.temperature == 0.0 for s in result.segments), model


def test_failing_windows_fall_back_to_higher_temperatures(tiny_en):
    # every decode has avg_logprob < 0, so a threshold of 0 fails every attempt: each window
    # goes through the whole schedule and keeps the last, hottest attempt
    torch.manual_seed(0)
    options = TranscribeOptions(logprob_threshold=0.0)
    schedule = options.temperatures
    assert schedule == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    result, info = transcribe_all(tiny_en, [(load_audio(JFK), options)])[0]
    assert info.windows >= 1
    assert info.fallbacks == info.windows * (len(schedule) - 1)
    assert result.segments
    assert all(segment.temperature == schedule[-1] > 0 for segment in result.segments)


def test_a_repeating_slice_falls_back_without_running_to_the_end(tiny_en):
    """A sliced window whose text already fails the compression check is not resumed: the
    next temperature starts at once. At the last temperature it is decoded to its end."""
    vocab = tiny_en.vocab
    loop = vocab.encode(" we will, we will, we will, we will,")
    sentence = vocab.encode(" We will rock you.")
    timestamp = vocab.timestamp_begin

    def run(options: TranscribeOptions) -> tuple[list[tuple[float, int]], Transcription]:
        calls: list[tuple[float, int]] = []

        async def model(jobs: list[DecodeJob]) -> list[DecodeResult]:
            (job,) = jobs
            calls.append((job.temperature, len(job.resume)))
            if job.temperature == 0.0:  # repeats itself, one slice after another
                tokens = [*job.resume, *(loop * 8)][: len(job.resume) + job.max_steps]
                done = len(tokens) >= 96
            else:
                tokens, done = [timestamp, *sentence, timestamp + 100], True
            return [
                DecodeResult(
                    tokens=tokens,
                    avg_logprob=-0.2,
                    no_speech_prob=0.0,
                    language="en",
                    language_probability=1.0,
                    temperature=job.temperature,
                    done=done,
                )
            ]

        audio = np.full(3 * SAMPLE_RATE, 0.1, np.float32)
        features = LogMel.from_checkpoint(tiny_en.checkpoint)
        done = asyncio.run(transcribe(audio, options, model, vocab, features))
        return calls, done.transcription

    sliced = TranscribeOptions(language="en", slice_tokens=32, part_of_long_file=True)
    calls, result = run(sliced)
    assert calls == [(0.0, 0), (0.2, 0)]
    assert result.text == "We will rock you."
    calls, _ = run(replace(sliced, temperature_increment=0.0))  # 0.0 is the only temperature
    assert calls == [(0.0, 0), (0.0, 32), (0.0, 64)]


def test_a_chunk_window_may_not_end_on_a_segment_opened_too_early(tiny_en):
    """``cover_until``: after a timestamp pair before it (speech left for another window),
    <|endoftext|> is refused, so the model goes on with that segment's text; after a later
    pair, or a segment's closing timestamp, it may end (openai-whisper's rules otherwise)."""
    vocab = tiny_en.vocab
    width = tiny_en.model.proj_out.out_features
    ts = [vocab.timestamp_begin + round(t / vocab.time_precision) for t in (0.0, 4.0, 20.0, 25.0)]
    text = vocab.encode(" Hello.")
    histories = {
        "open at 20 s": [ts[0], *text, ts[2], ts[2]],
        "open at 25 s": [ts[0], *text, ts[3], ts[3]],
        "closed at 4 s": [ts[0], *text, ts[1]],
    }
    jobs = [DecodeJob(resume=h, cover_until=24.0) for h in histories.values()]
    jobs.append(DecodeJob(resume=histories["open at 20 s"]))  # no cover_until: may end
    rules = _Rules(vocab, jobs, torch.device("cpu"), width)
    logits = torch.zeros(len(jobs), width)
    logits[:, vocab.eot] = 10.0  # likelier than all timestamps together: no timestamp forced
    logits = rules.apply(logits, torch.arange(len(jobs)), 0)
    may_end = torch.isfinite(logits[:, vocab.eot]).tolist()
    assert may_end == [False, True, True, True]


# --------------------------------------------------------------------------------------------
# batching


def test_one_batch_decodes_like_separate_calls(base_fp32):
    """Four windows with different prompts, languages and tasks in one decode_batch call give
    the same tokens as four calls of one (in fp32): batching across requests changes nothing."""
    base = base_fp32
    vocab, features = base.vocab, LogMel.from_checkpoint(base.checkpoint)
    clips = manifest()
    longform_text = clips["ljspeech_LJ001-0001_to_0016"]["text"]

    def window(path: str) -> tuple[np.ndarray, int]:
        audio = load_audio(path)[: N_FRAMES * HOP_LENGTH]
        return features(audio), len(audio) // HOP_LENGTH

    jfk_mel, jfk_frames = window(JFK)
    de_mel, de_frames = window(clips["fleurs-de-000"]["path"])
    fr_mel, _ = window(clips["fleurs-fr-000"]["path"])
    translate_mel, _ = window(clips["fleurs-de-004"]["path"])
    prompt = vocab.encode(" " + longform_text[:400])  # ~80 tokens: the others are left-padded
    jobs = [
        DecodeJob.for_window(
            jfk_mel, prompt=prompt, language="en", word_timestamps=True, num_frames=jfk_frames
        ),
        DecodeJob.for_window(de_mel, language="de", word_timestamps=True, num_frames=de_frames),
        DecodeJob.for_window(fr_mel, language=None),
        DecodeJob.for_window(translate_mel, language=None, task="translate"),
    ]
    assert len(prompt) > 50

    alone = [decode_batch(base, [job])[0] for job in jobs]
    together = decode_batch(base, jobs)

    assert [r.language for r in together] == ["en", "de", "fr", "de"]
    for i, (single, batched) in enumerate(zip(alone, together, strict=True)):
        assert single.error is None and batched.error is None, (single.error, batched.error)
        assert len([t for t in batched.tokens if t < vocab.eot]) >= 10, i
        assert batched.tokens == single.tokens, (
            i,
            vocab.decode(single.tokens),
            vocab.decode(batched.tokens),
        )
        assert batched.language == single.language
        assert batched.language_probability == pytest.approx(single.language_probability, 1e-4)
        assert batched.avg_logprob == pytest.approx(single.avg_logprob, abs=1e-4)
        assert batched.no_speech_prob == pytest.approx(single.no_speech_prob, abs=1e-4)
        assert np.isfinite(batched.avg_logprob)
        assert len(batched.token_times) == len(single.token_times)
        assert np.allclose(batched.token_times, single.token_times, atol=0.021), i
        assert np.allclose(batched.token_probs, single.token_probs, atol=1e-3), i
    # the prompt conditions the text, which stays JFK's ("ask" may become "asked")
    assert jiwer.wer(english(JFK_TEXT), english(vocab.decode(together[0].tokens))) <= 0.1
    # word timestamps: one start per text token plus a final end
    for i in (0, 1):
        text_tokens = [t for t in together[i].tokens if t < vocab.eot]
        assert len(together[i].token_times) == len(text_tokens) + 1


def test_sliced_decoding_resumes_to_the_same_tokens(base_fp32):
    """A window decoded a few tokens per call, resumed from its tokens so far (its first two
    slices in a batch with an unsliced neighbour), ends with the tokens, log-probability and
    word times of one call (in fp32). A resumed slice carries no features: it is decoded from
    the cached encoder output; without it, it comes back ``evicted`` (resent with its features
    by the long-form loop: test_evicted_slices_are_resent_with_their_features)."""
    base = base_fp32
    steps = 32  # slice_tokens' default
    features = LogMel.from_checkpoint(base.checkpoint)
    clips = manifest()
    longform = load_audio(LONGFORM)[: N_FRAMES * HOP_LENGTH]  # 30 s of dense speech
    de = load_audio(clips["fleurs-de-000"]["path"])[: N_FRAMES * HOP_LENGTH]
    sliced = DecodeJob.for_window(
        features(longform), language=None, word_timestamps=True, max_steps=steps, key="long:0"
    )
    neighbour = DecodeJob.for_window(features(de), language="de")
    unsliced = DecodeJob.for_window(features(longform), language=None, word_timestamps=True)
    (whole,) = decode_batch(base, [unsliced])
    assert whole.done and len(whole.tokens) > 60

    cache = EncoderCache(capacity=4)
    job, calls, cached = sliced, 0, []
    while True:
        # the neighbour's whole window is most of a call's time: only in the first two
        with_neighbour = calls < 2
        result, *other = decode_batch(base, [job, neighbour][: 1 + with_neighbour], cache)
        assert result.error is None and all(o.error is None for o in other)
        assert all(o.done for o in other)  # the unsliced neighbour finishes in its call
        assert not result.evicted
        calls += 1
        cached.append(len(cache))
        if result.done:
            break
        assert len(result.tokens) == steps * calls
        assert result.tokens == whole.tokens[: len(result.tokens)]
        job = job.resumed(result)
        assert job.features is None and job.resume == result.tokens
        if calls == 1:  # a model service without the window's encoder output
            (lost,) = decode_batch(base, [job], EncoderCache(capacity=4))
            assert lost.evicted and lost.tokens == [] and not lost.done and lost.error is None
    assert calls == -(-(len(whole.tokens) + 1) // steps)  # ceil: the last call samples eot
    assert result.tokens == whole.tokens
    assert result.language == whole.language == "en"
    assert result.avg_logprob == pytest.approx(whole.avg_logprob, abs=1e-4)
    assert result.no_speech_prob == pytest.approx(whole.no_speech_prob, abs=1e-4)
    assert np.allclose(result.token_times, whole.token_times, atol=0.021)
    # kept between slices, dropped once the window is done
    assert cached[:-1] == [1] * (calls - 1) and cached[-1] == 0


def test_a_window_ends_where_the_decoder_context_ends(base):
    """A maximal prompt and a window resumed up to the last of the decoder's 448 positions:
    one more token is sampled and the window is done, as openai-whisper stops once the sequence
    outgrows n_text_ctx (it used to feed position 448 and fail the request)."""
    vocab = base.vocab
    mel = LogMel.from_checkpoint(base.checkpoint)(load_audio(LONGFORM)[: N_FRAMES * HOP_LENGTH])
    prompt = vocab.encode(" the printing press" * 100)[-223:]
    prefix = 1 + len(prompt) + 3  # <|startofprev|>, prompt, <|startoftranscript|> en transcribe
    resume = vocab.encode(" and so on" * 100)[: 448 - prefix]
    job = DecodeJob.for_window(mel, prompt=prompt, language="en", resume=resume)
    (result,) = decode_batch(base, [job])
    assert result.error is None, result.error
    assert result.done
    assert result.tokens[: len(resume)] == resume
    assert len(result.tokens) <= len(resume) + 1


def test_long_audio_in_slices_gives_the_same_transcript(tiny_en, longform_run):
    """Served as configured: identical to whole windows in fp32, as accurate in bf16."""
    clip, (whole, info) = longform_run
    decode = Batcher(tiny_en, settle=0.0)
    options = TranscribeOptions(slice_tokens=PROFILE.slice_tokens)
    sliced, sliced_info = transcribe_all(tiny_en, [(load_audio(LONGFORM), options)], decode)[0]
    assert decode.evicted == 0  # every resumed slice found its window in the cache
    if tiny_en.dtype != torch.float32:
        reference = english(clip["text"])
        wers = [jiwer.wer(reference, english(run.text)) for run in (sliced, whole)]
        assert wers[0] <= wers[1] + 0.02, wers
        assert abs(sliced_info.windows - info.windows) <= 1
        return
    assert sliced_info.windows == info.windows
    assert [s.text for s in sliced.segments] == [s.text for s in whole.segments]
    assert [s.tokens for s in sliced.segments] == [s.tokens for s in whole.segments]


def test_evicted_slices_are_resent_with_their_features(tiny_en):
    """A model service whose cache lost every window (or another replica) answers each resumed
    slice ``evicted``; the long-form loop resends it with the features and the transcript is the
    one a cache gives (tiny.en, greedy: the same tokens either way)."""
    audio = load_audio(LONGFORM)[: 45 * SAMPLE_RATE]  # two windows, so they are sliced
    options = TranscribeOptions(slice_tokens=16)
    cached = Batcher(tiny_en, settle=0.0)
    losing = Batcher(tiny_en, settle=0.0, capacity=0)
    (kept, _), (resent, done) = (
        transcribe_all(tiny_en, [(audio, options)], cached)[0],
        transcribe_all(tiny_en, [(audio, options)], losing)[0],
    )
    assert cached.evicted == 0 and losing.evicted >= 4, (cached.evicted, losing.evicted)
    assert done.windows >= 2
    assert resent.text == kept.text and resent.text
    assert [s.tokens for s in resent.segments] == [s.tokens for s in kept.segments]


def test_prefix_encoder_is_the_encoder_on_a_whole_window(base_fp32):
    """encode_prefix on all 3000 frames is transformers' encoder: the short-window path (realtime
    partials) runs the same layers with the position embeddings cut to its length."""
    mel = LogMel.from_checkpoint(base_fp32.checkpoint)(load_audio(JFK))
    features = torch.from_numpy(mel[None]).to(base_fp32.device, base_fp32.dtype)
    with torch.inference_mode():
        full = base_fp32.model.model.encoder(features).last_hidden_state
        prefix = encode_prefix(base_fp32, features)
        short = encode_prefix(base_fp32, features[:, :, :1200])
    assert prefix.shape == full.shape and short.shape[1] == 600
    assert torch.allclose(prefix, full, atol=1e-4), (prefix - full).abs().max()
    assert not torch.allclose(short, full[:, :600], atol=1e-2)  # attention saw less context


def test_short_encodings_decode_jfk_and_batch_with_whole_windows(tiny_en_fp32):
    """A job encoding only its first frames (11 s of jfk in 1200 frames) decodes the clip's text;
    in one call with whole-window jobs each comes back as it does alone (fp32: bf16 is not
    batch-invariant)."""
    vocab, features = tiny_en_fp32.vocab, LogMel.from_checkpoint(tiny_en_fp32.checkpoint)
    audio = load_audio(JFK)
    mel, frames = features(audio), len(audio) // HOP_LENGTH

    def job(encode_frames: int | None) -> DecodeJob:
        return DecodeJob.for_window(
            mel, language="en", timestamps=False, num_frames=frames, encode_frames=encode_frames
        )

    whole, short, longer = job(None), job(1200), job(1500)
    alone = [decode_batch(tiny_en_fp32, [one])[0] for one in (whole, short, longer)]
    together = decode_batch(tiny_en_fp32, [short, whole, longer, short])
    assert [r.tokens for r in together] == [
        alone[1].tokens,
        alone[0].tokens,
        alone[2].tokens,
        alone[1].tokens,
    ]
    for result in alone:
        assert result.error is None
        assert jiwer.wer(english(JFK_TEXT), english(vocab.decode(result.tokens))) <= 0.1


@pytest.mark.parametrize("frames", [0, 1201, N_FRAMES + 2])
def test_encode_frames_out_of_range_or_odd_is_rejected(frames):
    with pytest.raises(ValueError):
        DecodeJob(encode_frames=frames)


# --------------------------------------------------------------------------------------------
# silence and short audio


@pytest.mark.parametrize("model", ["tiny.en", "base"])
def test_silent_window_yields_no_segments(models, model):
    result = transcribe_plain(models[model], np.zeros(N_FRAMES * HOP_LENGTH, dtype=np.float32))
    assert result.segments == []
    assert result.text == ""
    assert result.duration == pytest.approx(30.0)
    assert isinstance(result.language, str) and result.language


def test_faint_noise_is_skipped_by_the_no_speech_rule(base):
    # not digital silence: decoded, and skipped because no_speech_prob > 0.6 and
    # avg_logprob < -1 (base: ~0.99 and ~-1.96)
    noise = np.random.default_rng(0).standard_normal(N_FRAMES * HOP_LENGTH) * 0.01
    result, info = transcribe_one(base, noise.astype(np.float32))
    assert info.windows == 1
    assert result.segments == []
    assert result.text == ""


@pytest.mark.parametrize("model", ["tiny.en", "base"])
def test_window_shorter_than_a_second(models, model):
    audio = load_audio(JFK)[: int(0.75 * SAMPLE_RATE)]  # "And so"
    result = transcribe_plain(models[model], audio)
    assert result.duration == pytest.approx(0.75)
    assert words(result.text) == ["and", "so"], result.text
    assert result.segments
    for segment in result.segments:
        assert 0.0 <= segment.start < segment.end <= 0.75 + 0.001, segment


def test_every_container_gives_the_same_transcript(tiny_en):
    """jfk re-encoded into each format users send decodes (by content) and transcribes to the
    same words as the original FLAC (all in one batch)."""
    encoded = {
        name: decode_audio(ffmpeg("-i", str(EVAL_DIR / JFK), "-vn", *options, out_name=file_name))
        for name, (file_name, options) in ENCODINGS.items()
    }
    clips = {"original": load_audio(JFK), **encoded}
    runs = transcribe_all(tiny_en, [(audio, TranscribeOptions()) for audio in clips.values()])
    texts = {name: result.text for name, (result, _) in zip(clips, runs, strict=True)}
    assert english(texts["original"]) == english(JFK_TEXT)
    for name in encoded:
        assert english(texts[name]) == english(texts["original"]), (name, texts[name])
