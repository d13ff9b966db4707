"""Response formats: pure functions from a ``Transcription`` to the body OpenAI's SDK expects.

``json`` and ``verbose_json`` are returned as dicts built through the protocol models; ``text``,
``srt`` and ``vtt`` as strings, because the SDK hands those bodies back verbatim and a JSON
string there would reach the user with its quotes.
"""

from __future__ import annotations

import json
import math
from typing import assert_never

from pydantic import BaseModel

from ..transcript import Segment, Transcription
from .diarize import SpeakerSegment
from .protocol import (
    LANGUAGES,
    BadRequest,
    DiarizedSegmentModel,
    TokenLogprob,
    TranscriptionDiarized,
    TranscriptionJSON,
    TranscriptionRequest,
    TranscriptionSegmentModel,
    TranscriptionUsage,
    TranscriptionVerbose,
    TranscriptionWordModel,
    TranscriptTextDone,
    TranslationRequest,
)

JSON_MEDIA_TYPE = "application/json"
TEXT_MEDIA_TYPE = "text/plain; charset=utf-8"  # text and srt
VTT_MEDIA_TYPE = "text/vtt; charset=utf-8"  # WebVTT's registered type, which <track> wants
SSE_MEDIA_TYPE = "text/event-stream"


def render(
    result: Transcription,
    request: TranscriptionRequest | TranslationRequest,
    speakers: list[SpeakerSegment] | None = None,
) -> tuple[str | dict, str]:
    """Return the response body and its media type for ``request.response_format``.

    ``speakers``: the diarized segments, which ``diarized_json`` needs (and only it).

    ``include=["logprobs"]`` adds the text tokens' log-probabilities to ``json``, the only
    format OpenAI returns them in.
    """
    match request.response_format:
        case "json":
            body = TranscriptionJSON(
                text=result.text, usage=usage(result), logprobs=logprobs(result.segments, request)
            )
            return body.model_dump(exclude_none=True), JSON_MEDIA_TYPE
        case "verbose_json":
            return verbose_json(result, request), JSON_MEDIA_TYPE
        case "text":
            return result.text + "\n", TEXT_MEDIA_TYPE
        case "srt":
            return srt(result.segments), TEXT_MEDIA_TYPE
        case "vtt":
            return vtt(result.segments), VTT_MEDIA_TYPE
        case "diarized_json":
            if speakers is None:  # a route that does not diarize (yet)
                raise BadRequest(
                    "response_format 'diarized_json' is not available on this route.",
                    param="response_format",
                )
            return diarized_json(result, speakers), JSON_MEDIA_TYPE
        case _:
            assert_never(request.response_format)


def usage(result: Transcription) -> TranscriptionUsage:
    # OpenAI bills whole seconds, rounded up.
    return TranscriptionUsage(seconds=math.ceil(result.duration))


def language_name(result: Transcription) -> str:
    """The full lower-case name ``verbose_json`` reports; a translation's output is English."""
    if result.task == "translate":
        return "english"
    return LANGUAGES.get(result.language, result.language)


def verbose_json(result: Transcription, request: TranscriptionRequest | TranslationRequest) -> dict:
    # Translations take no timestamp_granularities and always report segments.
    granularities = (
        request.timestamp_granularities
        if isinstance(request, TranscriptionRequest)
        else ["segment"]
    )
    segments = words = None
    if "segment" in granularities:
        segments = [_segment_model(segment) for segment in result.segments]
    if "word" in granularities:
        words = [
            TranscriptionWordModel(word=w.word.strip(), start=w.start, end=w.end)
            for w in result.words
        ]
    body = TranscriptionVerbose(
        task=result.task,
        language=language_name(result),
        duration=result.duration,
        text=result.text,
        segments=segments,
        words=words,
        usage=usage(result),
    )
    # Lists that were not asked for are left out rather than sent as null.
    return body.model_dump(exclude_none=True)


def diarized_segment(segment: SpeakerSegment) -> DiarizedSegmentModel:
    """A diarized segment, as in ``diarized_json`` and as a ``transcript.text.segment`` event."""
    return DiarizedSegmentModel(
        id=f"seg_{segment.id}",
        start=segment.start,
        end=segment.end,
        text=segment.text.strip(),
        speaker=segment.speaker,
    )


def diarized_json(result: Transcription, speakers: list[SpeakerSegment]) -> dict:
    body = TranscriptionDiarized(
        duration=result.duration,
        text=result.text,
        segments=[diarized_segment(segment) for segment in speakers],
        usage=usage(result),
    )
    return body.model_dump()


def _segment_model(segment: Segment) -> TranscriptionSegmentModel:
    return TranscriptionSegmentModel(
        id=segment.id,
        seek=segment.seek,
        start=segment.start,
        end=segment.end,
        text=segment.text,
        tokens=segment.tokens,
        temperature=segment.temperature,
        avg_logprob=segment.avg_logprob,
        compression_ratio=segment.compression_ratio,
        no_speech_prob=segment.no_speech_prob,
    )


def timestamp(seconds: float, separator: str) -> str:
    """``HH:MM:SS<separator>mmm``, rounded to the millisecond; hours grow past 99 if needed."""
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(segments: list[Segment], separator: str) -> list[tuple[str, str]]:
    """(timing line, text) per segment with text; empty cues would break SRT's numbering."""
    cues = []
    for segment in segments:
        # "-->" inside a cue's text would read as a timing line (openai-whisper does the same).
        text = segment.text.strip().replace("-->", "->")
        if text:
            start, end = timestamp(segment.start, separator), timestamp(segment.end, separator)
            cues.append((f"{start} --> {end}", text))
    return cues


def srt(segments: list[Segment]) -> str:
    return "".join(
        f"{number}\n{timing}\n{text}\n\n"
        for number, (timing, text) in enumerate(_cues(segments, ","), start=1)
    )


def vtt(segments: list[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(f"{timing}\n{text}\n\n" for timing, text in _cues(segments, "."))


def done_event(
    result: Transcription, request: TranscriptionRequest | TranslationRequest
) -> TranscriptTextDone:
    """The last stream event: the whole text and the same usage (and logprobs) as ``json``."""
    return TranscriptTextDone(
        text=result.text, usage=usage(result), logprobs=logprobs(result.segments, request)
    )


def logprobs(
    segments: list[Segment], request: TranscriptionRequest | TranslationRequest
) -> list[TokenLogprob] | None:
    """The segments' token log-probabilities where ``include[]=logprobs`` asked for them."""
    if "logprobs" not in getattr(request, "include", ()):
        return None
    return [TokenLogprob(**vars(item)) for segment in segments for item in segment.logprobs]


def sse(event: BaseModel | dict) -> bytes:
    """One server-sent event, ``data: <json>`` and a blank line.

    Pass an ``OpenAIError.to_dict()`` to report a failure mid-stream: the SDK raises on a
    payload with an ``error`` key.
    """
    if isinstance(event, BaseModel):
        payload = event.model_dump_json(exclude_none=True)
    else:
        payload = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
