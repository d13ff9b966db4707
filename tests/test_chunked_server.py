"""Chunked transcription end to end: the suite's ``bentoml serve`` (base) and the openai SDK.

The engine-level tests (packing, noise, timestamps, long files) are in test_chunked.py.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator

import jiwer
import numpy as np
import openai
import pytest
from support import JFK, JFK_TEXT, english, hum, load_audio, pink, speech_then, white, words

from bentowhisper.server.longform import SAMPLE_RATE


def wav(audio: np.ndarray) -> tuple[str, bytes, str]:
    """An SDK ``file`` argument: 16-bit PCM WAV (the server's upload limit is 4 MB)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return ("audio.wav", buffer.getvalue(), "audio/wav")


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=300) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def jfk_then_noise() -> tuple[str, bytes, str]:
    return wav(speech_then(pink, -40))


@pytest.mark.parametrize(
    "strategy",
    [
        {},  # the `chunking` setting's default: auto
        {"chunking_strategy": "auto"},
        {"chunking_strategy": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 300}},
    ],
    ids=["default", "auto", "server_vad"],
)
def test_sdk_speech_then_noise_gives_only_the_speech(client, jfk_then_noise, strategy) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=jfk_then_noise,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
        **strategy,
    )
    assert len(words(result.text)) <= len(words(JFK_TEXT)), result.text
    assert jiwer.wer(english(JFK_TEXT), english(result.text)) <= 0.1, result.text
    assert result.segments and result.segments[-1].end <= 12.0
    assert result.words and result.words[-1].end <= 12.0
    assert result.duration == pytest.approx(101.0, abs=0.1)


@pytest.mark.parametrize(
    ("name", "make"),
    [("white-40", lambda: white(60, -40)), ("hum50-20", lambda: hum(60, 50, -20))],
)
def test_sdk_noise_alone_gives_no_words(client, name, make) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=wav(make()))
    assert result.text == ""


def test_sdk_stream_of_a_chunked_file(client, jfk_then_noise) -> None:
    events = list(
        client.audio.transcriptions.create(
            model="whisper-1", file=jfk_then_noise, stream=True, chunking_strategy="auto"
        )
    )
    done = events[-1]
    assert done.type == "transcript.text.done", events
    deltas = [event.delta for event in events[:-1]]
    assert deltas and "".join(deltas) == done.text
    assert words(done.text) == words(JFK_TEXT)


def test_none_keeps_the_sequential_loop(client) -> None:
    jfk = wav(load_audio(JFK))
    result = client.audio.transcriptions.create(
        model="whisper-1", file=jfk, extra_body={"chunking_strategy": "none"}
    )
    assert words(result.text) == words(JFK_TEXT)


@pytest.mark.parametrize(
    "strategy",
    [
        {"chunking_strategy": {"type": "server_vad", "threshold": 2}},
        {"chunking_strategy": {"type": "server_vad", "silence_duration_ms": -1}},
        {"chunking_strategy": "sometimes"},
        {"extra_body": {"chunking_strategy": '{"type": "server_vad", "prefix_padding_ms": "x"}'}},
    ],
)
def test_sdk_bad_chunking_strategy(client, strategy) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1", file=wav(load_audio(JFK)[:SAMPLE_RATE]), **strategy
        )
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "chunking_strategy" and error["type"] == "invalid_request_error"
