"""``diarized_json`` end to end: the real ``bentoml serve`` (its speaker-encoder service included)
driven by the unmodified ``openai`` SDK, on a mixture of two dev speakers with known turns."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import mixtures
import numpy as np
import openai
import pytest
from openai.types.audio import TranscriptionDiarized, TranscriptionTextSegmentEvent
from support import EVAL_DIR

pytestmark = pytest.mark.skipif(
    not (EVAL_DIR / "manifest.jsonl").exists(), reason=f"eval set not found at {EVAL_DIR}"
)


def wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    mixtures.write_wav(buffer, samples)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    # Whisper and the encoder share a loaded 2-core machine: a generous timeout.
    with openai.OpenAI(
        base_url=server.base_url, api_key="test-key", max_retries=0, timeout=300
    ) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def mix() -> mixtures.Mixture:
    # A held-out 2-speaker mixture (seeds 0-9 tuned the clustering): about 20 s, one window.
    return mixtures.build(2, 10, mixtures.material())


def agreement(segments, mix: mixtures.Mixture, names: dict[str, str]) -> float:
    """The share of the segments' time whose label is the speaker of the reference turn there;
    ``names`` maps each reference speaker to the label expected for it."""
    right = total = 0.0
    for segment in segments:
        for start, end, speaker in mix.turns:
            overlap = max(0.0, min(end, segment.end) - max(start, segment.start))
            total += overlap
            right += overlap * (segment.speaker == names[speaker])
    assert total > 0, segments
    return right / total


def majority(segments, mix: mixtures.Mixture) -> dict[str, str]:
    """Reference speaker -> the label that covers most of its turns."""
    out = {}
    for speaker in mix.speakers:
        time: dict[str, float] = {}
        for segment in segments:
            for start, end, who in mix.turns:
                if who == speaker:
                    overlap = max(0.0, min(end, segment.end) - max(start, segment.start))
                    time[segment.speaker] = time.get(segment.speaker, 0.0) + overlap
        out[speaker] = max(time, key=time.__getitem__)
    return out


def test_two_speakers_at_their_turns(client, mix) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("mix.wav", wav(mix.audio), "audio/wav"),
        response_format="diarized_json",
        chunking_strategy="auto",
    )
    assert isinstance(result, TranscriptionDiarized), result
    assert result.text.strip() and result.segments, result
    assert {s.speaker for s in result.segments} == {"A", "B"}, result.segments
    first, last = mix.turns[0][0], mix.turns[-1][1]
    for segment in result.segments:
        assert segment.type == "transcript.text.segment"
        assert first - 0.5 <= segment.start < segment.end <= last + 0.5, (segment, mix.turns)
    names = majority(result.segments, mix)
    assert sorted(names.values()) == ["A", "B"], names  # one label per speaker
    assert agreement(result.segments, mix, names) >= 0.85, (result.segments, mix.turns)


def test_known_speakers_are_named(client, mix) -> None:
    # References: 4 s of each speaker's own material, as data URLs.
    material = mixtures.material()
    names = {s: f"spk-{s}" for s in mix.speakers}
    references = [
        "data:audio/wav;base64," + base64.b64encode(wav(material[s][: 4 * 16000])).decode()
        for s in mix.speakers
    ]
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("mix.wav", wav(mix.audio), "audio/wav"),
        response_format="diarized_json",
        chunking_strategy="auto",
        known_speaker_names=list(names.values()),
        known_speaker_references=references,
    )
    assert {s.speaker for s in result.segments} == set(names.values()), result.segments
    assert agreement(result.segments, mix, names) >= 0.85, (result.segments, mix.turns)


def test_streamed_segments_carry_speakers(client, mix) -> None:
    events = list(
        client.audio.transcriptions.create(
            model="whisper-1",
            file=("mix.wav", wav(mix.audio), "audio/wav"),
            response_format="diarized_json",
            chunking_strategy="auto",
            stream=True,
        )
    )
    segments = [e for e in events if isinstance(e, TranscriptionTextSegmentEvent)]
    assert [e.type for e in events] == ["transcript.text.segment"] * len(segments) + [
        "transcript.text.done"
    ], events
    assert {s.speaker for s in segments} == {"A", "B"}, segments
    assert agreement(segments, mix, majority(segments, mix)) >= 0.85, segments


def test_names_without_references_is_a_400(client, mix) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1",
            file=("mix.wav", wav(mix.audio), "audio/wav"),
            response_format="diarized_json",
            known_speaker_names=["ann"],
        )
    error = caught.value.response.json()["error"]
    assert error["param"] == "known_speaker_names", error
    assert error["type"] == "invalid_request_error", error
