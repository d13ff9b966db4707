"""End to end: ``bentoml serve service:BentoWhisper`` driven by the unmodified ``openai`` SDK.

The session-scoped ``server`` fixture (conftest.py) starts the real server from the repository
root with ``BENTOWHISPER_MAX_UPLOAD_MB=4`` and a key file that requires ``test-key`` only while
the ``api_key`` fixture is active (clients send that key throughout, harmlessly). Every call
goes through ``openai.OpenAI`` unless the point is the raw wire (``httpx``), using real speech
from the shared eval set. Tests run in file order; the batching test is last so that BentoML's
calibration dispatches are over by then.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.audio import (
    Transcription,
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
    Translation,
)
from support import ERROR_KEYS, EVAL_DIR, reference, wer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

API_KEY = "test-key"
JFK = EVAL_DIR / "audio/en_misc/jfk.flac"
GERMAN = EVAL_DIR / "audio/fleurs_de/fleurs-de-000.ogg"
SEGMENT_FIELDS = {
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
}

english = EnglishTextNormalizer()
basic = BasicTextNormalizer()

pytestmark = pytest.mark.skipif(not JFK.exists(), reason=f"eval set not found at {EVAL_DIR}")


def words(text: str) -> list[str]:
    return english(text).split()


def audio(path: Path) -> tuple[str, bytes, str]:
    """An SDK ``file`` argument: (filename, content, content type)."""
    kind = {".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}[path.suffix]
    return (path.name, path.read_bytes(), kind)


def error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    """The ``error`` object of an SDK exception, checked to be OpenAI's four-key envelope."""
    payload = exc.response.json()
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert exc.body == error  # what the SDK hands to the user
    return error


def raw_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/json"), (content_type, response.text)
    payload = response.json()
    assert set(payload) == {"error"} and set(payload["error"]) == ERROR_KEYS, payload
    return payload["error"]


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120
    ) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    """A raw client on the server root (no ``/v1``), authenticated."""
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as raw:
        yield raw


@pytest.fixture(scope="module")
def jfk() -> tuple[str, bytes, str]:
    return audio(JFK)


@pytest.fixture(scope="module")
def jfk_text() -> str:
    return reference("jfk")


# --------------------------------------------------------------------------------------------
# Response formats


def test_json_is_the_default(client, jfk, jfk_text):
    result = client.audio.transcriptions.create(model="whisper-1", file=jfk)

    assert isinstance(result, Transcription)
    assert words(result.text) == words(jfk_text)
    assert result.usage is not None
    assert result.usage.type == "duration"
    assert result.usage.seconds == 11


def test_verbose_json_with_words_and_segments(client, jfk, jfk_text):
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1",
        file=jfk,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    body = raw.http_response.json()
    result = raw.parse()

    assert isinstance(result, TranscriptionVerbose)
    assert result.language == "english"
    assert isinstance(body["duration"], float)
    assert result.duration == pytest.approx(11.0, abs=0.1)
    assert words(result.text) == words(jfk_text)

    assert body["segments"], body
    for index, segment in enumerate(body["segments"]):
        assert set(segment) == SEGMENT_FIELDS, segment
        assert segment["id"] == index
        assert isinstance(segment["seek"], int) and segment["seek"] >= 0
        assert 0.0 <= segment["start"] <= segment["end"] <= result.duration + 0.05
        assert segment["avg_logprob"] < 0
        assert 0.0 <= segment["no_speech_prob"] <= 1.0
        assert segment["compression_ratio"] > 0
        assert segment["tokens"] and all(isinstance(t, int) for t in segment["tokens"])
        assert segment["temperature"] == 0.0
    assert result.segments is not None and len(result.segments) == len(body["segments"])

    assert result.words, "word timestamps were asked for"
    assert words(" ".join(word.word for word in result.words)) == words(result.text)
    previous_end = 0.0
    for word in result.words:
        assert word.word and word.word == word.word.strip()
        assert previous_end - 0.01 <= word.start <= word.end <= result.duration + 0.05
        previous_end = word.end


def test_verbose_json_segment_granularity_has_no_words(client, jfk):
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1",
        file=jfk,
        response_format="verbose_json",
        timestamp_granularities=["segment"],
    )
    body = raw.http_response.json()

    assert "words" not in body, body
    assert body["segments"] and set(body["segments"][0]) == SEGMENT_FIELDS
    assert raw.parse().words is None


@pytest.mark.parametrize("response_format", ["text", "srt", "vtt"])
def test_plain_text_formats(client, jfk, jfk_text, response_format):
    body = client.audio.transcriptions.create(
        model="whisper-1", file=jfk, response_format=response_format
    )

    assert isinstance(body, str)
    assert not body.startswith('"'), "served as a JSON string"
    if response_format == "text":
        assert words(body) == words(jfk_text)
    elif response_format == "srt":
        # chunked by default: the first cue starts where the VAD found speech (jfk: 0.05 s)
        assert re.match(r"1\n00:00:00,\d{3} --> ", body), body
        cues = [block.split("\n") for block in body.strip().split("\n\n")]
        for number, (index, timing, *_) in enumerate(cues, start=1):
            assert index == str(number)
            assert re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", timing)
        assert words(" ".join(" ".join(lines) for _, _, *lines in cues)) == words(jfk_text)
    else:
        assert body.startswith("WEBVTT\n\n"), body
        assert re.search(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\n", body)


# --------------------------------------------------------------------------------------------
# Request options


def test_language_german(client):
    result = client.audio.transcriptions.create(
        model="whisper-1", file=audio(GERMAN), language="de", response_format="verbose_json"
    )

    assert result.language == "german"
    assert wer(reference("fleurs-de-000"), result.text, basic) < 0.5, result.text


def test_unknown_language_is_a_bad_request(client, jfk):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=jfk, language="xx")

    assert error_body(caught.value)["param"] == "language"


def test_prompt_conditions_the_transcript(client, jfk, jfk_text):
    """Whisper continues the style of its prompt: after a lower-case prompt without
    punctuation the transcript comes out so too (without a prompt it is capitalised and
    punctuated), so this fails if the prompt is ignored."""
    style = (
        "and so my fellow americans ask not what your country can do for you"
        " ask what you can do for your country"
    )
    plain = client.audio.transcriptions.create(model="whisper-1", file=jfk)
    prompted = client.audio.transcriptions.create(model="whisper-1", file=jfk, prompt=style)

    assert words(prompted.text) == words(plain.text) == words(jfk_text)
    assert re.search(r"[A-Z]", plain.text) and re.search(r"[,.]", plain.text), plain.text
    assert prompted.text == prompted.text.lower(), prompted.text
    assert not re.search(r"[,.]", prompted.text), prompted.text


def test_temperature(client, jfk, jfk_text):
    result = client.audio.transcriptions.create(
        model="whisper-1", file=jfk, temperature=0.4, response_format="verbose_json"
    )

    assert result.segments
    assert all(segment.temperature >= 0.4 - 1e-6 for segment in result.segments)
    # Sampling may change a word or two, not the speech.
    assert wer(jfk_text, result.text) <= 0.25, result.text


def test_translation_to_english(client):
    result = client.audio.translations.create(model="whisper-1", file=audio(GERMAN))

    assert isinstance(result, Translation)
    found = set(words(result.text)) & {"the", "best", "view", "views", "island", "hong", "kong"}
    assert len(found) >= 3, result.text


def test_streaming(client, jfk, jfk_text):
    stream = client.audio.transcriptions.create(model="whisper-1", file=jfk, stream=True)
    events = list(stream)

    deltas = [e for e in events if isinstance(e, TranscriptionTextDeltaEvent)]
    assert deltas, events
    assert all(e.type == "transcript.text.delta" for e in deltas)
    done = events[-1]
    assert isinstance(done, TranscriptionTextDoneEvent), events
    assert done.type == "transcript.text.done"
    assert done.text == "".join(e.delta for e in deltas)
    assert words(done.text) == words(jfk_text)


def assert_token_logprobs(logprobs, text: str) -> None:
    """One entry per text token, each a log-probability (<= 0) whose bytes are its token's,
    and the tokens join to the text."""
    assert logprobs, "no logprobs"
    for item in logprobs:
        assert item.logprob <= 0.0 and item.logprob > -50, item
        assert bytes(int(b) for b in item.bytes) == item.token.encode(), item  # SDK: floats
    assert "".join(item.token for item in logprobs).strip() == text.strip()


def test_include_logprobs(client, jfk, jfk_text):
    result = client.audio.transcriptions.create(
        model="whisper-1", file=jfk, include=["logprobs"], language="en"
    )
    assert words(result.text) == words(jfk_text)
    assert_token_logprobs(result.logprobs, result.text)
    # a confident transcript: most tokens are near-certain
    assert sorted(item.logprob for item in result.logprobs)[len(result.logprobs) // 2] > -0.5
    plain = client.audio.transcriptions.create(model="whisper-1", file=jfk, language="en")
    assert plain.logprobs is None  # only when asked for


def test_include_logprobs_streamed(client, jfk):
    events = list(
        client.audio.transcriptions.create(
            model="whisper-1", file=jfk, include=["logprobs"], language="en", stream=True
        )
    )
    deltas = [e for e in events if isinstance(e, TranscriptionTextDeltaEvent)]
    done = events[-1]
    assert isinstance(done, TranscriptionTextDoneEvent)
    for delta in deltas:
        assert_token_logprobs(delta.logprobs, delta.delta)
    assert_token_logprobs(done.logprobs, done.text)
    assert [x.token for x in done.logprobs] == [x.token for d in deltas for x in d.logprobs]


# --------------------------------------------------------------------------------------------
# Models


def test_models(client):
    listed = [model.id for model in client.models.list()]
    assert "whisper-1" in listed and "base" in listed

    model = client.models.retrieve("whisper-1")
    assert model.id == "whisper-1" and model.object == "model"

    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    error_body(caught.value)


# --------------------------------------------------------------------------------------------
# Errors, as the SDK's typed exceptions with OpenAI's envelope


def test_undecodable_file(client):
    noise = os.urandom(64 * 1024)
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("x.mp3", noise, "audio/mpeg"))

    error = error_body(caught.value)
    assert error["param"] == "file"
    assert error["type"] == "invalid_request_error"


def test_unknown_model(client, jfk):
    with pytest.raises(openai.NotFoundError) as caught:
        client.audio.transcriptions.create(model="gpt-x", file=jfk)

    assert error_body(caught.value)["param"] == "model"


def test_right_api_key(api_key, client, jfk, jfk_text):
    assert api_key == API_KEY
    result = client.audio.transcriptions.create(model="whisper-1", file=jfk)

    assert words(result.text) == words(jfk_text)


def test_wrong_api_key(server, api_key, jfk):
    wrong = openai.OpenAI(base_url=server.base_url, api_key="wrong-key", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError) as caught:
        wrong.audio.transcriptions.create(model="whisper-1", file=jfk)

    assert caught.value.status_code == 401
    error_body(caught.value)


def test_missing_api_key(server, api_key, jfk):
    response = httpx.post(
        server.base_url + "/audio/transcriptions",
        files={"file": jfk},
        data={"model": "whisper-1"},
        timeout=60,
    )

    raw_error(response, 401)


def test_upload_over_the_limit(client):
    too_big = os.urandom(5 * 1024 * 1024)  # the server's limit is 4 MiB
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1", file=("big.mp3", too_big, "audio/mpeg")
        )

    assert caught.value.status_code == 413
    assert error_body(caught.value)["param"] == "file"


def test_unknown_response_format(client, jfk):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1",
            file=jfk,
            response_format="xml",  # type: ignore[arg-type]
        )

    assert error_body(caught.value)["param"] == "response_format"


def test_word_timestamps_need_verbose_json(client, jfk):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1",
            file=jfk,
            response_format="json",
            timestamp_granularities=["word"],
        )

    assert error_body(caught.value)["param"] == "timestamp_granularities"


def test_json_body_is_unsupported_media_type(http):
    response = http.post("/v1/audio/transcriptions", json={"model": "whisper-1"})

    raw_error(response, 415)


def test_still_healthy_after_errors(client, http, jfk, jfk_text):
    assert http.get("/readyz", timeout=10).status_code == 200
    result = client.audio.transcriptions.create(model="whisper-1", file=jfk)
    assert words(result.text) == words(jfk_text)


# --------------------------------------------------------------------------------------------
# The raw wire, as clients other than the SDK send it


def test_granularities_without_brackets(http, jfk):
    response = http.post(
        "/v1/audio/transcriptions",
        files={"file": jfk},
        data={
            "model": "whisper-1",
            "response_format": "verbose_json",
            "timestamp_granularities": ["word", "segment"],  # repeated key, no []
        },
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["words"] and body["segments"]


def test_granularities_with_brackets_repeated(http, jfk):
    response = http.post(
        "/v1/audio/transcriptions",
        files={"file": jfk},
        data={
            "model": "whisper-1",
            "response_format": "verbose_json",
            "timestamp_granularities[]": ["word", "segment"],
        },
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["words"] and body["segments"]


def test_string_temperature_and_unknown_fields(http, jfk, jfk_text):
    response = http.post(
        "/v1/audio/transcriptions",
        files={"file": jfk},
        data={
            "model": "whisper-1",
            "temperature": "0.0",
            "response_format": "verbose_json",
            "some_future_option": "yes",
            "metadata[user]": "42",
            "vad_filter": "true",
        },
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert words(body["text"]) == words(jfk_text)
    assert all(segment["temperature"] == 0.0 for segment in body["segments"])


def test_route_without_v1_prefix(server, jfk, jfk_text):
    with openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120) as sdk:
        result = sdk.audio.transcriptions.create(model="whisper-1", file=jfk)

    assert words(result.text) == words(jfk_text)


# --------------------------------------------------------------------------------------------
# Adaptive batching


def batch_size_histogram(metrics: str, method: str = "decode") -> tuple[float, float, float]:
    """(observations with batch size <= 1, observation count, sum of batch sizes) for ``method``
    from BentoML's ``bentoml_service_adaptive_batch_size`` histogram, over all workers."""
    ones = count = total = 0.0
    pattern = re.compile(r"^bentoml_service_adaptive_batch_size_(bucket|count|sum)\{(.*)\} (\S+)$")
    for line in metrics.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        kind, labels, value = match.groups()
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if label.get("method_name") != method:
            continue
        if kind == "bucket" and float(label["le"]) == 1.0:
            ones += float(value)
        elif kind == "count":
            count += float(value)
        elif kind == "sum":
            total += float(value)
    return ones, count, total


def test_concurrent_requests_are_batched(server, client, http, jfk, jfk_text):
    before = batch_size_histogram(http.get("/metrics").text)

    def one(_: int) -> str:
        return client.audio.transcriptions.create(model="whisper-1", file=jfk).text

    with ThreadPoolExecutor(max_workers=8) as pool:  # max_batch_size: one full batch
        texts = list(pool.map(one, range(8)))
    server.track()  # remember the workers and any FFmpeg still running, for the teardown check

    assert all(words(text) == words(jfk_text) for text in texts), texts
    after = batch_size_histogram(http.get("/metrics").text)
    ones, count, total = (a - b for a, b in zip(after, before, strict=True))
    assert count > 0, f"no decode batches recorded: {after}"
    assert ones < count and total > count, (
        f"no batch larger than 1 among {count:.0f} batches (sizes summing to {total:.0f})"
    )


# --------------------------------------------------------------------------------------------
# Known server bugs, last so that ``-x`` does not hide the tests above while they fail


def test_unknown_path_gets_the_openai_envelope(http):
    # The contract: every error body is OpenAI's envelope; api.py's 404 handler means to do it,
    # but paths outside its routes get BentoML's plain-text "Not Found" (fails until fixed).
    response = http.post("/v1/audio/speech", json={"model": "tts-1", "input": "hi"})

    assert raw_error(response, 404)["message"]
