"""Protocol types: requests as the real openai SDK encodes them, validation errors, envelopes."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from starlette.requests import Request

from bentowhisper.server.protocol import (
    LANGUAGES,
    BadRequest,
    InternalError,
    Model,
    ModelList,
    NotFound,
    OpenAIError,
    PayloadTooLarge,
    RateLimited,
    ServerVadChunking,
    ServiceUnavailable,
    TranscriptionRequest,
    TranslationRequest,
    Unauthorized,
    UnsupportedMediaType,
    normalize_language,
    parse_form,
)

try:  # openai >= 3 talks through the httpx2 fork; older releases through httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed SDK
    import httpx

AUDIO = ("speech.wav", b"RIFF\x00\x00\x00\x00WAVE", "audio/wav")


def sdk_client(handler: Any) -> openai.OpenAI:
    """The unmodified SDK, its HTTP answered in-process by ``handler``."""
    transport = httpx.MockTransport(handler)
    return openai.OpenAI(
        api_key="test-key",
        base_url="http://testserver/v1",
        http_client=openai.DefaultHttpxClient(transport=transport),
        max_retries=0,
    )


def multipart_items(request: httpx.Request) -> list[tuple[str, Any]]:
    """Parse the SDK's multipart body with starlette, as the server will."""
    body = request.read()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def parse() -> list[tuple[str, Any]]:
        scope = {
            "type": "http",
            "method": "POST",
            "path": request.url.path,
            "headers": [(b"content-type", request.headers["content-type"].encode())],
        }
        form = await Request(scope, receive).form()
        return form.multi_items()

    return asyncio.run(parse())


def sent_form(call: str = "transcriptions", **kwargs: Any) -> list[tuple[str, Any]]:
    """Form items the SDK sends for ``client.audio.<call>.create(file=AUDIO, **kwargs)``."""
    captured: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        captured.append(request)
        if kwargs.get("stream"):
            body = b'data: {"type": "transcript.text.done", "text": ""}\n\n'
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"text": ""})

    result = getattr(sdk_client(handler).audio, call).create(file=AUDIO, **kwargs)
    if kwargs.get("stream"):
        list(result)
    (request,) = captured
    assert request.url.path == f"/v1/audio/{call}"
    return multipart_items(request)


def form_keys(items: list[tuple[str, Any]]) -> list[str]:
    return [key for key, _ in items]


# --------------------------------------------------------------------------------------------
# What the SDK sends, parsed


def test_sdk_transcription_with_every_parameter() -> None:
    items = sent_form(
        model="whisper-1",
        timestamp_granularities=["word", "segment"],
        include=["logprobs"],
        temperature=0.2,
        language="de",
        prompt="x",
        response_format="verbose_json",
        chunking_strategy={"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 200},
        extra_body={"foo": "bar", "beam_size": 5},
    )
    keys = form_keys(items)
    # The wire shape parse_form has to cope with: bracketed arrays and objects, strings only.
    assert keys.count("timestamp_granularities[]") == 2
    assert "include[]" in keys
    assert "chunking_strategy[type]" in keys
    assert ("temperature", "0.2") in items
    assert ("foo", "bar") in items
    assert "file" in keys

    request = parse_form(items)

    assert request == TranscriptionRequest(
        model="whisper-1",
        language="de",
        prompt="x",
        response_format="verbose_json",
        temperature=0.2,
        timestamp_granularities=["word", "segment"],
        stream=False,
        include=["logprobs"],
        chunking_strategy=ServerVadChunking(
            type="server_vad", threshold=0.5, silence_duration_ms=200
        ),
    )
    assert request.word_timestamps


def test_sdk_defaults() -> None:
    request = parse_form(sent_form(model="whisper-1"))

    assert isinstance(request, TranscriptionRequest)
    assert request.response_format == "json"
    assert request.temperature == 0.0
    assert request.timestamp_granularities == ["segment"]
    assert request.language is None
    assert request.prompt is None
    assert request.stream is False
    assert request.include == []
    assert request.chunking_strategy is None
    assert not request.word_timestamps


def test_sdk_streaming_auto_chunking_and_integer_temperature() -> None:
    items = sent_form(model="whisper-1", stream=True, chunking_strategy="auto", temperature=0)
    assert ("stream", "true") in items
    assert ("temperature", "0") in items

    request = parse_form(items)

    assert request.stream is True
    assert request.chunking_strategy == "auto"
    assert request.temperature == 0.0


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's, for whisper-1
def test_sdk_translation() -> None:
    items = sent_form(
        "translations",
        model="whisper-1",
        prompt="Hello",
        response_format="srt",
        temperature=0.4,
        extra_body={"language": "de"},
    )

    request = parse_form(items, translation=True)

    assert request == TranslationRequest(
        model="whisper-1", prompt="Hello", response_format="srt", temperature=0.4
    )


# --------------------------------------------------------------------------------------------
# Other clients' spellings


@pytest.mark.parametrize(
    "items",
    [
        [("timestamp_granularities", "word"), ("timestamp_granularities", "segment")],
        [("timestamp_granularities", "word, segment")],
        [("timestamp_granularities[0]", "word"), ("timestamp_granularities[1]", "segment")],
    ],
)
def test_granularities_without_brackets(items: list[tuple[str, str]]) -> None:
    form = [("model", "whisper-1"), ("response_format", "verbose_json"), *items]
    assert parse_form(form).timestamp_granularities == ["word", "segment"]


def test_include_without_brackets() -> None:
    assert parse_form([("model", "m"), ("include", "logprobs")]).include == ["logprobs"]


def test_unknown_keys_empty_values_and_uploads_are_ignored() -> None:
    request = parse_form(
        [
            ("model", "whisper-1"),
            ("file", object()),  # an UploadFile in a real form
            ("language", ""),
            ("prompt", "  "),
            ("keywords[]", "Bento"),
            ("chunking_strategy[type]", "server_vad"),
            ("model[x]", "ignored"),
            ("not a key", "x"),
        ]
    )
    assert request.language is None
    assert request.prompt is None
    assert request.chunking_strategy == ServerVadChunking(type="server_vad")


def test_repeated_scalar_last_wins() -> None:
    assert parse_form([("model", "a"), ("model", "b")]).model == "b"


def test_translation_ignores_transcription_only_fields() -> None:
    request = parse_form(
        [
            ("model", "m"),
            ("language", "xx"),
            ("stream", "true"),
            ("timestamp_granularities[]", "?"),
        ],
        translation=True,
    )
    assert request == TranslationRequest(model="m")


# --------------------------------------------------------------------------------------------
# Languages


def test_language_table_is_whispers() -> None:
    assert len(LANGUAGES) == 100
    assert LANGUAGES["en"] == "english"
    assert LANGUAGES["de"] == "german"
    assert LANGUAGES["yue"] == "cantonese"
    assert LANGUAGES["haw"] == "hawaiian"
    assert all(name == name.lower() for name in LANGUAGES.values())


def test_language_table_matches_transformers() -> None:
    whisper = pytest.importorskip("transformers.models.whisper.tokenization_whisper")
    assert whisper.LANGUAGES == LANGUAGES


@pytest.mark.parametrize(
    ("given", "code"),
    [("de", "de"), ("DE", "de"), ("German", "de"), (" english ", "en"), ("mandarin", "zh")],
)
def test_language_codes_and_names(given: str, code: str) -> None:
    assert normalize_language(given) == code
    assert parse_form([("model", "m"), ("language", given)]).language == code


@pytest.mark.parametrize("language", ["xx", "en-US", "klingon"])
def test_unknown_language(language: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_form([("model", "m"), ("language", language)])
    assert info.value.param == "language"
    assert language in info.value.message


# --------------------------------------------------------------------------------------------
# Validation errors name the wire field


@pytest.mark.parametrize(
    ("items", "param"),
    [
        ([("temperature", "1.5")], "temperature"),
        ([("temperature", "-0.1")], "temperature"),
        ([("temperature", "warm")], "temperature"),
        ([("temperature", "nan")], "temperature"),
        ([("response_format", "xml")], "response_format"),
        ([("timestamp_granularities[]", "words")], "timestamp_granularities"),
        ([("timestamp_granularities[]", "word")], "timestamp_granularities"),
        (
            [("response_format", "srt"), ("timestamp_granularities[]", "word")],
            "timestamp_granularities",
        ),
        ([("include[]", "tokens")], "include"),
        ([("stream", "maybe")], "stream"),
        ([("chunking_strategy", "manual")], "chunking_strategy"),
        ([("chunking_strategy[type]", "client_vad")], "chunking_strategy"),
        (
            [("chunking_strategy[type]", "server_vad"), ("chunking_strategy[threshold]", "2")],
            "chunking_strategy",
        ),
        (
            [("chunking_strategy[type]", "server_vad"), ("chunking_strategy[colour]", "red")],
            "chunking_strategy",
        ),
    ],
)
def test_invalid_field_names_param(items: list[tuple[str, str]], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_form([("model", "whisper-1"), *items])
    error = info.value
    assert error.status_code == 400
    assert error.param == param
    assert error.to_dict()["error"]["param"] == param


def test_bad_value_is_quoted_in_the_message() -> None:
    with pytest.raises(BadRequest) as info:
        parse_form([("model", "m"), ("response_format", "xml")])
    assert "'xml'" in info.value.message
    assert "verbose_json" in info.value.message


def test_segment_granularity_is_accepted_with_any_format() -> None:
    request = parse_form([("model", "m"), ("timestamp_granularities[]", "segment")])
    assert request.response_format == "json"


def test_missing_model() -> None:
    with pytest.raises(BadRequest) as info:
        parse_form([("language", "en")])
    assert info.value.param == "model"
    assert info.value.message == "Missing required parameter: 'model'."


@pytest.mark.parametrize("temperature", ["0", "1", "1.0", "0.5"])
def test_temperature_bounds_are_inclusive(temperature: str) -> None:
    assert parse_form([("model", "m"), ("temperature", temperature)]).temperature == float(
        temperature
    )


# --------------------------------------------------------------------------------------------
# Error envelopes


@pytest.mark.parametrize(
    ("error", "status", "type_", "code"),
    [
        (BadRequest("bad", param="file"), 400, "invalid_request_error", None),
        (Unauthorized(), 401, "invalid_request_error", "invalid_api_key"),
        (NotFound.model("whisper-9"), 404, "invalid_request_error", "model_not_found"),
        (PayloadTooLarge(param="file"), 413, "invalid_request_error", None),
        (UnsupportedMediaType(), 415, "invalid_request_error", None),
        (RateLimited(retry_after=1.2), 429, "requests", "rate_limit_exceeded"),
        (ServiceUnavailable(retry_after=5), 503, "server_error", None),
        (InternalError(), 500, "server_error", None),
    ],
)
def test_error_envelope(error: OpenAIError, status: int, type_: str, code: str | None) -> None:
    body = error.to_dict()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert error.status_code == status
    assert body["error"]["type"] == error.type == type_
    assert body["error"]["code"] == code
    assert str(error) == error.message


def test_retry_after_is_whole_seconds() -> None:
    assert RateLimited(retry_after=1.2).headers == {"Retry-After": "2"}
    assert ServiceUnavailable(retry_after=5).headers == {"Retry-After": "5"}
    assert RateLimited().headers is None


def test_not_found_model() -> None:
    error = NotFound.model("whisper-9")
    assert error.param == "model"
    assert "whisper-9" in error.message


@pytest.mark.parametrize(
    ("error", "exception"),
    [
        (BadRequest("Invalid file format.", param="file"), openai.BadRequestError),
        (Unauthorized(), openai.AuthenticationError),
        (NotFound.model("whisper-9"), openai.NotFoundError),
        (PayloadTooLarge(param="file"), openai.APIStatusError),
        (RateLimited(retry_after=1), openai.RateLimitError),
        (ServiceUnavailable(retry_after=1), openai.InternalServerError),
        (InternalError(), openai.InternalServerError),
    ],
)
def test_sdk_reads_our_errors(error: OpenAIError, exception: type[openai.APIStatusError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(error.status_code, json=error.to_dict(), headers=error.headers)

    with pytest.raises(exception) as info:
        sdk_client(handler).audio.transcriptions.create(file=AUDIO, model="whisper-1")
    raised = info.value
    assert raised.status_code == error.status_code
    assert raised.message.endswith(error.message)
    assert raised.body == error.to_dict()["error"]
    assert raised.type == error.type
    assert raised.param == error.param
    assert raised.code == error.code


def test_sdk_reads_our_model_list() -> None:
    models = ModelList(
        data=[
            Model(id="whisper-1", created=1_700_000_000, owned_by="bentowhisper"),
            Model(id="base", created=1_700_000_000, owned_by="bentowhisper"),
        ]
    )
    assert models.model_dump()["object"] == "list"

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(200, json=models.model_dump())

    page = sdk_client(handler).models.list()
    assert [model.id for model in page] == ["whisper-1", "base"]
    assert all(model.object == "model" for model in page)
    assert page.data[0].owned_by == "bentowhisper"
    assert openai.types.Model.model_validate(models.data[0].model_dump()).created == 1_700_000_000
