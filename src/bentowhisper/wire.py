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
    schema-able pydantic fields, and bytes cost no conversion on either side. A resumed slice
    (:meth:`resumed`) carries none: the model service still holds the window's encoder output
    under ``key``, and answers ``evicted`` when it no longer does (:meth:`with_features_of`).
    The steps from one job to the next are methods, so each goes through validation.
    """

    features: bytes | None = None  # float32 log-mel, shape (n_mels, 3000), C order
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
    resume_logprobs: list[float] = Field(default_factory=list)  # and each one's
    key: str | None = None  # identifies the window across slices (the encoder cache key)
    # Encode only the window's first frames (None: all 3000). A realtime partial of a 2 s turn
    # then pays for ~5 s of encoder instead of 30 s, as whisper.cpp's audio_ctx does; even,
    # since the encoder's second convolution halves the frames.
    encode_frames: int | None = Field(None, ge=2, le=N_FRAMES, multiple_of=2)
    # Seconds from the window's start: no <|endoftext|> right after a timestamp earlier than
    # this, i.e. with speech left open before it (a chunk's window decodes all its speech).
    cover_until: float | None = None

    @classmethod
    def for_window(cls, mel: np.ndarray, **fields: object) -> DecodeJob:
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        return cls(features=mel.tobytes(), n_mels=mel.shape[0], **fields)

    def mel(self) -> np.ndarray:
        if self.features is None:
            raise ValueError(f"job {self.key!r} carries no features (a resumed slice)")
        return np.frombuffer(self.features, dtype=np.float32).reshape(self.n_mels, N_FRAMES)

    def at_temperature(self, temperature: float) -> DecodeJob:
        """The window decoded from its start again, at ``temperature`` (Whisper's fallback)."""
        return self._with(temperature=temperature)

    def in_language(self, language: str) -> DecodeJob:
        """The job with its language fixed (as detected on an earlier attempt or slice)."""
        return self._with(language=language)

    def resumed(self, result: DecodeResult) -> DecodeJob:
        """The next slice after the unfinished ``result``: its tokens so far, in the language it
        detected, without the features (the model service holds the window's encoder output)."""
        if result.done or self.key is None:
            raise ValueError("only an unfinished slice of a keyed job can be resumed")
        return self._with(
            features=None,
            resume=result.tokens,
            resume_logprob=result.sum_logprob,
            resume_logprobs=result.token_logprobs,
            language=result.language,
        )

    def with_features_of(self, original: DecodeJob) -> DecodeJob:
        """This slice again with the window's features, for a model service that evicted it."""
        return self._with(features=original.features, n_mels=original.n_mels)

    def _with(self, **changes: object) -> DecodeJob:
        return DecodeJob.model_validate({**dict(self), **changes})


class DecodeResult(BaseModel):
    tokens: list[int]  # sampled text and timestamp tokens, without <|endoftext|>
    avg_logprob: float
    sum_logprob: float = 0.0  # what a resumed slice starts from
    token_logprobs: list[float] = Field(default_factory=list)  # one per token in ``tokens``
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
    # The job carried no features and the model service no longer holds its encoder output
    # (evicted from its cache, or another replica): send it again with the features.
    evicted: bool = False

    @classmethod
    def evicted_for(cls, job: DecodeJob) -> DecodeResult:
        return cls(
            tokens=[],
            avg_logprob=0.0,
            no_speech_prob=0.0,
            language=job.language or "",
            language_probability=0.0,
            temperature=job.temperature,
            done=False,
            evicted=True,
        )

    def detected_with(self, first: DecodeResult) -> DecodeResult:
        """This last slice's result with the language probability its first slice measured."""
        return DecodeResult.model_validate(
            {**dict(self), "language_probability": first.language_probability}
        )


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
