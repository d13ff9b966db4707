"""The types and constants that cross between the two services (pydantic and numpy only).

The API service builds a :class:`DecodeJob` per 30 s window and sends it to the model service's
batchable ``decode``; a :class:`DecodeResult` comes back. Nothing here imports torch, so the API
process never loads it.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

N_FRAMES = 3000  # mel frames in a 30 s window (100 per second)
SAMPLE_LEN = 224  # openai-whisper: at most n_text_ctx // 2 sampled tokens per window
MAX_PROMPT = 223  # previous-text tokens kept: n_text_ctx // 2 - 1
MAX_INITIAL_TIMESTAMP = 1.0  # seconds: the first timestamp may not start later than this


class DecodeJob(BaseModel):
    """One 30 s window to decode; everything it needs travels with it between services.

    The log-mel features travel as raw float32 bytes: BentoML's inter-service serde wants
    schema-able pydantic fields, and bytes cost no conversion on either side.
    """

    features: bytes  # float32 log-mel, shape (n_mels, 3000), C order
    n_mels: int = 80
    prompt: list[int] = Field(default_factory=list)  # previous-text tokens, no <|startofprev|>
    language: str | None = None  # ISO code; None: detect from this window
    task: str = "transcribe"
    temperature: float = 0.0
    timestamps: bool = True
    word_timestamps: bool = False
    num_frames: int = N_FRAMES  # frames of real audio in the window (for alignment)
    max_steps: int | None = Field(None, ge=1)  # tokens to sample in this call; None: to the end
    resume: list[int] = Field(default_factory=list)  # tokens sampled by earlier slices
    resume_logprob: float = 0.0  # their summed log-probability
    key: str | None = None  # identifies the window across slices (the encoder cache key)

    @classmethod
    def for_window(cls, mel: np.ndarray, **fields: object) -> DecodeJob:
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        return cls(features=mel.tobytes(), n_mels=mel.shape[0], **fields)

    def mel(self) -> np.ndarray:
        return np.frombuffer(self.features, dtype=np.float32).reshape(self.n_mels, N_FRAMES)


class DecodeResult(BaseModel):
    tokens: list[int]  # sampled text and timestamp tokens, without <|endoftext|>
    avg_logprob: float
    sum_logprob: float = 0.0  # what a resumed slice starts from
    done: bool = True  # False: the step budget ran out first; resubmit with ``resume``
    no_speech_prob: float
    language: str
    language_probability: float
    temperature: float
    # With word_timestamps: per text token (tokens < eot) its start time in seconds from the
    # window start, plus one final end time; and each text token's probability.
    token_times: list[float] = Field(default_factory=list)
    token_probs: list[float] = Field(default_factory=list)
    error: str | None = None  # set when this item failed; the other items are unaffected


# --- Speaker embeddings (diarization) -----------------------------------------------------------
# The API service cuts speech into overlapping 1.6 s windows and sends them as one EmbedJob per
# stretch of audio; the speaker encoder answers one 256-d embedding per window.

SPEAKER_WINDOW = 25600  # samples (1.6 s at 16 kHz): the window length the encoder was trained on
SPEAKER_DIM = 256


class EmbedJob(BaseModel):
    """A stretch of 16 kHz audio and where its windows start; the audio travels once, not once
    per (overlapping) window. A window running past the end is zero-padded."""

    audio: bytes  # float32 16 kHz mono samples
    starts: list[int] = Field(default_factory=list)  # window starts, in samples into ``audio``

    @classmethod
    def for_audio(cls, samples: np.ndarray, starts: list[int]) -> EmbedJob:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        return cls(audio=samples.tobytes(), starts=starts)

    def samples(self) -> np.ndarray:
        return np.frombuffer(self.audio, dtype=np.float32)


class EmbedResult(BaseModel):
    embeddings: bytes  # float32, shape (len(job.starts), SPEAKER_DIM), L2-normalised rows
    error: str | None = None  # set when this item failed; the other items are unaffected

    @classmethod
    def for_embeddings(cls, embeddings: np.ndarray) -> EmbedResult:
        return cls(embeddings=np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())

    def array(self) -> np.ndarray:
        return np.frombuffer(self.embeddings, dtype=np.float32).reshape(-1, SPEAKER_DIM)
