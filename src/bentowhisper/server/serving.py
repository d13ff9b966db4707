"""One way to run a transcription, whichever front end it came in by.

A front end (the plain JSON/text/srt/vtt response, the SSE stream, and the chunked and realtime
paths) parses its request, then hands the rest to a :class:`Run`:

* admission: at most ``max_concurrent_requests`` in flight per API worker, else 429;
* the deadline: decoding stops ``TIMEOUT_MARGIN_S`` before BentoML's ``traffic.timeout``,
  with OpenAI's envelope instead of BentoML's own 504 body;
* cancellation: the client's leaving is awaited as an event, and the decoding stops before its
  next model call (499 in the metrics);
* errors, mapped once: client errors keep their 4xx; an overloaded, unreachable or shedding
  model service is 503 with ``Retry-After``; anything else (a failed item, a bug) is a 500
  ``server_error`` whose message carries a request id that the log line carries too, never the
  exception's text;
* the request's line in ``bentowhisper_requests_total``, with the status the client saw, for a
  stream too (recorded when the stream ends).

The long-form loop yields typed events (:mod:`.longform`); front ends only render them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Settings
from ..vocabulary import Vocabulary
from .audio import AudioDecodeError, decode_audio
from .chunked import Lanes, request_events
from .diarize import EmbedFn
from .longform import (
    DecodeFn,
    FeaturesFn,
    TranscribeOptions,
    TranscriptionDone,
    TranscriptionEvent,
)
from .metrics import metrics
from .protocol import (
    BadRequest,
    GatewayTimeout,
    InternalError,
    OpenAIError,
    RateLimited,
    ServiceUnavailable,
    TranscriptionRequest,
    TranslationRequest,
)

log = logging.getLogger(__name__)
# BentoML answers a request still running at ``traffic.timeout`` with a 504 of its own whose
# body is not OpenAI's envelope; stop decoding this much earlier and answer in the envelope.
TIMEOUT_MARGIN_S = 1.0
RETRY_AFTER_S = 5  # what a 503 asks clients to wait
Disconnected = Callable[[], Awaitable[None]]  # returns once the client has gone


class ModelUnavailable(RuntimeError):
    """The model service could not be reached, shed the work or did not answer in time.

    A ``DecodeFn`` raises it for transient failures only (a 503 with ``Retry-After``); any
    other exception is taken for a bug (a 500), so that clients do not retry those."""


class ClientClosedRequest(OpenAIError):
    """The client went away; nobody reads this response, the status is for the logs (nginx's)."""

    status_code = 499
    error_type = "invalid_request_error"


class Admission:
    """At most ``limit`` requests in flight per API worker; beyond that, 429 with Retry-After,
    so that clients back off instead of queueing without bound behind the model."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> Callable[[], None]:
        """Take a slot (RateLimited when none is free); returns its idempotent release."""
        if self.active >= self.limit:
            raise RateLimited(
                f"Too many concurrent requests (limit {self.limit}); retry shortly.",
                retry_after=2,
            )
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1

        return release


@dataclass(frozen=True)
class Backend:
    """What the front ends need from the service that hosts them."""

    settings: Settings
    vocab: Vocabulary
    features: FeaturesFn  # one 30 s window of samples -> log-mel features
    decode: DecodeFn  # the batching model service
    admission: Admission
    # The speaker encoder service, for diarized_json; None where the host has none.
    embed: EmbedFn | None = None
    lanes: Lanes = field(default_factory=Lanes)  # short requests before long files' chunks

    @property
    def model_names(self) -> list[str]:
        return [*self.settings.model_aliases, self.settings.model]

    @property
    def api_keys(self) -> list[str]:
        keys = list(self.settings.api_keys)
        if self.settings.api_key_file:
            lines = Path(self.settings.api_key_file).read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return keys

    def events(
        self, audio: np.ndarray, options: TranscribeOptions, chunking_strategy: object = None
    ) -> AsyncIterator[TranscriptionEvent]:
        """The transcription of ``audio`` against this backend's model service: VAD chunks or
        the long-form loop, as the request's ``chunking_strategy`` and the settings say."""
        return request_events(
            audio,
            chunking_strategy,
            options,
            self.decode,
            self.vocab,
            self.features,
            self.settings,
            self.lanes,
        )


def request_options(
    params: TranscriptionRequest | TranslationRequest, backend: Backend
) -> TranscribeOptions:
    """The decoding options of a parsed request, checked against the served model."""
    vocab = backend.vocab
    language = getattr(params, "language", None)
    if language is not None and language not in vocab.languages:
        supported = "English only" if not vocab.is_multilingual else "this model's languages"
        raise BadRequest(
            f"Language {language!r} is not supported by the served model ({supported}).",
            param="language",
        )
    if isinstance(params, TranslationRequest) and not vocab.is_multilingual:
        raise BadRequest("The served model is English-only and cannot translate.", param="model")
    return TranscribeOptions(
        language=language,
        task="translate" if isinstance(params, TranslationRequest) else "transcribe",
        prompt=params.prompt,
        temperature=params.temperature,
        # diarized_json assigns words to speakers by their timestamps
        word_timestamps=getattr(params, "word_timestamps", False)
        or getattr(params, "diarize", False),
        slice_tokens=backend.settings.slice_tokens or None,
    )


async def decode_upload(data: bytes, settings: Settings) -> np.ndarray:
    """The upload as 16 kHz mono samples; undecodable audio is a 400 with the reason as code."""
    try:
        return await asyncio.to_thread(
            decode_audio,
            data,
            max_seconds=settings.max_audio_seconds,
            timeout_s=settings.decode_timeout_s,
        )
    except AudioDecodeError as exc:
        metrics().decode_failures.labels(exc.reason).inc()
        raise BadRequest(str(exc), param="file", code=exc.reason) from None


class Run:
    """One request to an audio endpoint, from admission to its metric (see the module doc).

    Use it through :func:`started`. A plain response awaits :meth:`complete`; a front end that
    has already answered (SSE, a websocket) iterates :meth:`stream` instead, which hands the
    request's end (its admission slot and its metric) over to the stream."""

    def __init__(self, backend: Backend, endpoint: str) -> None:
        self.backend = backend
        self.endpoint = endpoint
        self.request_id = f"req_{uuid.uuid4().hex[:20]}"
        self.deadline = time.monotonic() + backend.settings.request_timeout_s - TIMEOUT_MARGIN_S
        self.response_format = "unknown"
        self.streaming = False
        self.done: TranscriptionDone | None = None
        self._release: Callable[[], None] | None = None
        self._finished = False

    def admit(self) -> None:
        """Take an admission slot, held until the request ends (RateLimited: 429)."""
        self._release = self.backend.admission.acquire()

    def finish(self, status: int, done: TranscriptionDone | None = None) -> None:
        """Record the request's end once: its status, and what a finished one decoded."""
        if self._finished:
            return
        self._finished = True
        if self._release is not None:
            self._release()
        recorded = metrics()
        recorded.requests.labels(self.endpoint, self.response_format, str(status)).inc()
        if done is not None:
            recorded.audio_seconds.labels(done.transcription.task).inc(done.transcription.duration)
            recorded.windows.inc(done.windows)
            recorded.fallbacks.inc(done.fallbacks)

    def error(self, exc: BaseException) -> OpenAIError:
        """The client-visible error for ``exc`` (the one place where failures are mapped)."""
        if isinstance(exc, OpenAIError):
            return exc
        if isinstance(exc, ModelUnavailable):
            log.warning("request %s: model service unavailable: %s", self.request_id, exc)
            return ServiceUnavailable(
                "The model service is unavailable or overloaded; retry shortly.",
                retry_after=RETRY_AFTER_S,
            )
        log.error("request %s failed", self.request_id, exc_info=exc)
        return InternalError(
            f"The server had an error processing your request (request id {self.request_id})."
        )

    async def complete(
        self, events: AsyncIterator[TranscriptionEvent], disconnected: Disconnected
    ) -> TranscriptionDone:
        """Run the transcription to its end for a response sent all at once."""
        async with contextlib.aclosing(self._guarded(events, disconnected)) as guarded:
            async for event in guarded:
                if isinstance(event, TranscriptionDone):
                    self.done = event
                    return event
        raise AssertionError("the transcription ended without TranscriptionDone")

    def stream(
        self, events: AsyncIterator[TranscriptionEvent], disconnected: Disconnected
    ) -> AsyncIterator[TranscriptionEvent | OpenAIError]:
        """The events for a front end that has already answered; a failure comes last, as an
        :class:`OpenAIError` to report in-band. The request ends (slot, metric) with it."""
        self.streaming = True
        return self._stream(events, disconnected)

    async def _stream(
        self, events: AsyncIterator[TranscriptionEvent], disconnected: Disconnected
    ) -> AsyncIterator[TranscriptionEvent | OpenAIError]:
        try:
            async with contextlib.aclosing(self._guarded(events, disconnected)) as guarded:
                async for event in guarded:
                    if isinstance(event, TranscriptionDone):
                        self.finish(200, event)
                    yield event
        except OpenAIError as exc:
            self.finish(exc.status_code)
            yield exc
        finally:  # closed or cancelled by a consumer whose client has gone
            self.finish(ClientClosedRequest.status_code)

    async def _guarded(
        self, events: AsyncIterator[TranscriptionEvent], disconnected: Disconnected
    ) -> AsyncIterator[TranscriptionEvent]:
        """The events, stopped (before the next model call) when the client leaves or the
        deadline passes; every failure raised as its :meth:`error`."""
        gone = asyncio.ensure_future(disconnected())
        step: asyncio.Future[TranscriptionEvent] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(events))
                remaining = max(self.deadline - time.monotonic(), 0)
                await asyncio.wait(
                    {step, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if not step.done():
                    step.cancel()
                    await asyncio.wait({step})  # its model call is cancelled before we answer
                    if gone.done():
                        raise ClientClosedRequest("The client closed the connection.")
                    raise GatewayTimeout(
                        "The transcription took longer than the server's request time limit"
                        " and was stopped; send shorter audio, or retry when the server is"
                        " less busy."
                    )
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    raise self.error(exc) from exc
                yield event
        finally:
            gone.cancel()
            if step is not None and not step.done():
                # Cancelled from outside (a stream's response, whose client left, is cancelled
                # by a cancel scope that cancels every later await too): the step stops at its
                # next await and the generator ends with it; nothing here may await.
                step.cancel()
            else:
                await events.aclose()  # type: ignore[attr-defined]


@contextlib.contextmanager
def started(backend: Backend, endpoint: str) -> Iterator[Run]:
    """A :class:`Run` for the block; the request ends with the block unless it streams. An
    exception leaving the block is mapped (:meth:`Run.error`) and counted with its status."""
    run = Run(backend, endpoint)
    try:
        yield run
    except asyncio.CancelledError:  # the handler was cancelled: its client has gone
        run.finish(ClientClosedRequest.status_code)
        raise
    except Exception as exc:
        error = run.error(exc)
        run.finish(error.status_code)
        if error is exc:
            raise
        raise error from exc
    else:
        if not run.streaming:
            run.finish(200, run.done)
