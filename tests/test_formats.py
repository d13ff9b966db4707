"""Response formats over hand-built transcriptions, checked against the real openai SDK parsers."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai.types.audio import (
    Transcription as SDKTranscription,
)
from openai.types.audio import (
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranslationVerbose,
)
from openai.types.audio import (
    TranscriptionVerbose as SDKTranscriptionVerbose,
)

from bentowhisper.server.formats import (
    JSON_MEDIA_TYPE,
    SSE_MEDIA_TYPE,
    TEXT_MEDIA_TYPE,
    VTT_MEDIA_TYPE,
    done_event,
    render,
    sse,
    timestamp,
)
from bentowhisper.server.protocol import (
    BadRequest,
    TranscriptionRequest,
    TranscriptTextDelta,
    TranslationRequest,
)
from bentowhisper.transcript import Segment, TokenLogprob, Transcription, Word

try:  # openai >= 3 talks through the httpx2 fork; older releases through httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed SDK
    import httpx

AUDIO = ("speech.wav", b"RIFF\x00\x00\x00\x00WAVE", "audio/wav")


def segment(
    number: int, start: float, end: float, text: str, words: tuple[Word, ...] = ()
) -> Segment:
    return Segment(
        id=number,
        seek=int(start * 100) // 3000 * 3000,
        start=start,
        end=end,
        text=text,
        tokens=[50364, 400 + number, 50574],
        temperature=0.0,
        avg_logprob=-0.28,
        compression_ratio=1.23,
        no_speech_prob=0.01,
        words=list(words),
    )


def speech(duration: float = 11.0, language: str = "en", task: str = "transcribe") -> Transcription:
    return Transcription(
        text="And so, my fellow Americans, ask not.",
        segments=[
            segment(
                0,
                0.0,
                4.2,
                " And so, my fellow Americans,",
                (Word(" And", 0.0, 0.24, 0.9), Word(" so,", 0.24, 0.5, 0.8)),
            ),
            segment(1, 4.2, 7.64, " ask not.", (Word(" ask", 4.2, 4.6, 0.95),)),
        ],
        language=language,
        duration=duration,
        task=task,
    )


def transcription(**fields: Any) -> TranscriptionRequest:
    return TranscriptionRequest(model="whisper-1", **fields)


def sdk_client(handler: Any) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="test-key",
        base_url="http://testserver/v1",
        http_client=openai.DefaultHttpxClient(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )


def serve(body: str | dict | bytes, media_type: str) -> openai.OpenAI:
    """An SDK client whose server answers every call with ``body``."""
    if isinstance(body, dict):
        content = json.dumps(body).encode()
    else:
        content = body if isinstance(body, bytes) else body.encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=content, headers={"content-type": media_type})

    return sdk_client(handler)


# --------------------------------------------------------------------------------------------
# json


def test_json() -> None:
    body, media_type = render(speech(), transcription())

    assert media_type == JSON_MEDIA_TYPE
    assert body == {
        "text": "And so, my fellow Americans, ask not.",
        "usage": {"type": "duration", "seconds": 11},
    }
    parsed = SDKTranscription.model_validate(body)
    assert parsed.usage.type == "duration"
    assert parsed.usage.seconds == 11


@pytest.mark.parametrize(("duration", "seconds"), [(11.0, 11), (11.2, 12), (0.0, 0), (0.01, 1)])
def test_usage_rounds_up(duration: float, seconds: int) -> None:
    body, _ = render(speech(duration=duration), transcription())
    assert body["usage"] == {"type": "duration", "seconds": seconds}


def test_json_logprobs_only_when_included() -> None:
    result = speech()
    result.segments[0].logprobs = [TokenLogprob(" And", -0.01, list(b" And"))]
    result.segments[1].logprobs = [TokenLogprob(" ask", -0.5, list(b" ask"))]
    body, _ = render(result, transcription(include=["logprobs"]))
    assert body["logprobs"] == [
        {"token": " And", "logprob": -0.01, "bytes": list(b" And")},
        {"token": " ask", "logprob": -0.5, "bytes": list(b" ask")},
    ]
    assert "logprobs" not in render(result, transcription())[0]
    # OpenAI returns them in json only
    assert (
        "logprobs"
        not in render(result, transcription(include=["logprobs"], response_format="verbose_json"))[
            0
        ]
    )


# --------------------------------------------------------------------------------------------
# verbose_json


def test_verbose_json_default_has_segments_not_words() -> None:
    body, media_type = render(speech(), transcription(response_format="verbose_json"))

    assert media_type == JSON_MEDIA_TYPE
    assert list(body) == ["task", "language", "duration", "text", "segments", "usage"]
    assert body["task"] == "transcribe"
    assert body["language"] == "english"
    assert body["duration"] == 11.0
    assert isinstance(body["duration"], float)
    assert body["segments"][0] == {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": 4.2,
        "text": " And so, my fellow Americans,",
        "tokens": [50364, 400, 50574],
        "temperature": 0.0,
        "avg_logprob": -0.28,
        "compression_ratio": 1.23,
        "no_speech_prob": 0.01,
    }
    parsed = SDKTranscriptionVerbose.model_validate(body)
    assert parsed.words is None
    assert [s.text for s in parsed.segments] == [" And so, my fellow Americans,", " ask not."]
    assert parsed.usage.seconds == 11


def test_verbose_json_words_only() -> None:
    request = transcription(response_format="verbose_json", timestamp_granularities=["word"])
    body, _ = render(speech(), request)

    assert "segments" not in body
    # OpenAI's words carry no leading space (Whisper's tokens do)
    assert body["words"] == [
        {"word": "And", "start": 0.0, "end": 0.24},
        {"word": "so,", "start": 0.24, "end": 0.5},
        {"word": "ask", "start": 4.2, "end": 4.6},
    ]
    assert SDKTranscriptionVerbose.model_validate(body).segments is None


def test_verbose_json_words_and_segments() -> None:
    request = transcription(
        response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    body, _ = render(speech(), request)

    parsed = SDKTranscriptionVerbose.model_validate(body)
    assert len(parsed.segments) == 2
    assert [w.word for w in parsed.words] == ["And", "so,", "ask"]


def test_verbose_json_without_speech_keeps_an_empty_segment_list() -> None:
    silent = Transcription(text="", segments=[], language="en", duration=3.5)
    body, _ = render(silent, transcription(response_format="verbose_json"))
    assert body["segments"] == []
    assert body["text"] == ""


@pytest.mark.parametrize(
    ("code", "name"), [("en", "english"), ("de", "german"), ("yue", "cantonese")]
)
def test_verbose_json_reports_full_language_name(code: str, name: str) -> None:
    body, _ = render(speech(language=code), transcription(response_format="verbose_json"))
    assert body["language"] == name


def test_translation_verbose_json_is_english() -> None:
    result = speech(language="de", task="translate")
    body, _ = render(result, TranslationRequest(model="whisper-1", response_format="verbose_json"))

    assert body["task"] == "translate"
    assert body["language"] == "english"
    assert "words" not in body
    parsed = TranslationVerbose.model_validate(body)
    assert parsed.language == "english"
    assert len(parsed.segments) == 2


# --------------------------------------------------------------------------------------------
# text, srt, vtt


def test_text() -> None:
    body, media_type = render(speech(), transcription(response_format="text"))
    assert body == "And so, my fellow Americans, ask not.\n"
    assert media_type == TEXT_MEDIA_TYPE


def test_srt() -> None:
    body, media_type = render(speech(), transcription(response_format="srt"))
    assert media_type == TEXT_MEDIA_TYPE
    assert body == (
        "1\n"
        "00:00:00,000 --> 00:00:04,200\n"
        "And so, my fellow Americans,\n"
        "\n"
        "2\n"
        "00:00:04,200 --> 00:00:07,640\n"
        "ask not.\n"
        "\n"
    )


def test_vtt() -> None:
    body, media_type = render(speech(), transcription(response_format="vtt"))
    assert media_type == VTT_MEDIA_TYPE
    assert body == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:04.200\n"
        "And so, my fellow Americans,\n"
        "\n"
        "00:00:04.200 --> 00:00:07.640\n"
        "ask not.\n"
        "\n"
    )


def test_subtitles_without_speech() -> None:
    silent = Transcription(text="", segments=[], language="en", duration=3.0)
    assert render(silent, transcription(response_format="srt"))[0] == ""
    assert render(silent, transcription(response_format="vtt"))[0] == "WEBVTT\n\n"


def test_empty_cues_are_skipped_and_numbering_stays_dense() -> None:
    result = Transcription(
        text="Hi there",
        segments=[
            segment(0, 0.0, 1.0, " Hi"),
            segment(1, 1.0, 2.0, " "),
            segment(2, 2.0, 3.0, " there"),
        ],
        language="en",
        duration=3.0,
    )
    body, _ = render(result, transcription(response_format="srt"))
    assert body.split("\n\n")[:2] == [
        "1\n00:00:00,000 --> 00:00:01,000\nHi",
        "2\n00:00:02,000 --> 00:00:03,000\nthere",
    ]


def test_arrow_in_cue_text_cannot_pass_for_a_timing_line() -> None:
    result = Transcription(
        text="a --> b", segments=[segment(0, 0.0, 1.0, " a --> b")], language="en", duration=1.0
    )
    body, _ = render(result, transcription(response_format="vtt"))
    assert body == "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\na -> b\n\n"


@pytest.mark.parametrize(
    ("seconds", "srt", "vtt"),
    [
        (0.0, "00:00:00,000", "00:00:00.000"),
        (4.2, "00:00:04,200", "00:00:04.200"),
        (3661.2344, "01:01:01,234", "01:01:01.234"),
        (59.9996, "00:01:00,000", "00:01:00.000"),  # rounding carries into the minutes
        (360_000.5, "100:00:00,500", "100:00:00.500"),
        (-0.01, "00:00:00,000", "00:00:00.000"),
    ],
)
def test_timestamp(seconds: float, srt: str, vtt: str) -> None:
    assert timestamp(seconds, ",") == srt
    assert timestamp(seconds, ".") == vtt


# --------------------------------------------------------------------------------------------
# The SDK, end to end, reads what we serve


@pytest.mark.parametrize("response_format", ["text", "srt", "vtt"])
def test_sdk_returns_plain_formats_verbatim(response_format: str) -> None:
    body, media_type = render(speech(), transcription(response_format=response_format))
    client = serve(body, media_type)

    got = client.audio.transcriptions.create(
        file=AUDIO, model="whisper-1", response_format=response_format
    )

    assert got == body


def test_sdk_parses_served_json_and_verbose_json() -> None:
    body, media_type = render(speech(), transcription())
    got = serve(body, media_type).audio.transcriptions.create(file=AUDIO, model="whisper-1")
    assert got.text == "And so, my fellow Americans, ask not."
    assert got.usage.seconds == 11

    request = transcription(
        response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    body, media_type = render(speech(), request)
    got = serve(body, media_type).audio.transcriptions.create(
        file=AUDIO,
        model="whisper-1",
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert got.language == "english"
    assert got.duration == 11.0
    assert got.segments[1].seek == 0
    assert got.words[2].end == 4.6


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's, for whisper-1
def test_sdk_parses_served_translation() -> None:
    result = speech(language="fr", task="translate")
    body, media_type = render(result, TranslationRequest(model="whisper-1"))
    got = serve(body, media_type).audio.translations.create(file=AUDIO, model="whisper-1")
    assert got.text == result.text


# --------------------------------------------------------------------------------------------
# Streaming


def test_sse_bytes() -> None:
    assert sse(TranscriptTextDelta(delta=" Grüße")) == (
        'data: {"type":"transcript.text.delta","delta":" Grüße"}\n\n'.encode()
    )
    assert sse(done_event(speech(duration=2.5), TranscriptionRequest(model="whisper-1"))) == (
        b'data: {"type":"transcript.text.done","text":"And so, my fellow Americans, ask not.",'
        b'"usage":{"type":"duration","seconds":3}}\n\n'
    )


def test_sdk_reads_our_stream() -> None:
    result = speech()
    stream = b"".join(
        [
            sse(TranscriptTextDelta(delta=" And so, my fellow Americans,")),
            sse(TranscriptTextDelta(delta=" ask not.")),
            sse(done_event(result, TranscriptionRequest(model="whisper-1"))),
        ]
    )

    client = serve(stream, SSE_MEDIA_TYPE)
    events = list(client.audio.transcriptions.create(file=AUDIO, model="whisper-1", stream=True))

    assert [type(event) for event in events] == [
        TranscriptionTextDeltaEvent,
        TranscriptionTextDeltaEvent,
        TranscriptionTextDoneEvent,
    ]
    assert "".join(event.delta for event in events[:2]).strip() == events[2].text == result.text
    # The SDK types the done event's usage as token usage; it builds what we send without
    # validating, so duration usage arrives intact.
    assert events[2].usage.type == "duration"
    assert events[2].usage.seconds == 11


def test_sdk_raises_on_an_error_event() -> None:
    error = BadRequest("The audio could not be decoded.", param="file")
    stream = sse(TranscriptTextDelta(delta=" And")) + sse(error.to_dict())

    events = serve(stream, SSE_MEDIA_TYPE).audio.transcriptions.create(
        file=AUDIO, model="whisper-1", stream=True
    )
    with pytest.raises(openai.APIError, match="could not be decoded"):
        list(events)
