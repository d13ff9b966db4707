"""What a transcription produces: engine-side result types shared by decoding and formatting.

These are plain dataclasses, independent of the OpenAI wire format (see ``protocol.py``) so that
the decoding loop never imports web code and the response formats never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass
class TokenLogprob:
    """A text token as ``include[]=logprobs`` reports it: its text, log-probability and bytes."""

    token: str
    logprob: float
    bytes: list[int]


@dataclass
class Segment:
    """One segment with the ten fields OpenAI's ``verbose_json`` carries, plus its words."""

    id: int
    seek: int  # mel frames (100 per second) where the segment's 30 s window starts
    start: float
    end: float
    text: str  # keeps Whisper's leading space
    tokens: list[int]  # text and timestamp token ids of this segment
    temperature: float
    avg_logprob: float
    compression_ratio: float  # gzip ratio of ``text``
    no_speech_prob: float
    words: list[Word] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # its text tokens'


@dataclass
class Transcription:
    text: str
    segments: list[Segment]
    language: str  # ISO-639-1 code, e.g. "en"
    duration: float  # seconds of audio
    task: str = "transcribe"  # or "translate"
    language_probability: float = 1.0

    @property
    def words(self) -> list[Word]:
        return [word for segment in self.segments for word in segment.words]
