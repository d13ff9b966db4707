"""The OpenAI-compatible HTTP surface: a FastAPI app that BentoML mounts in the API service.

Routes parse and check the request, decode the upload, run the long-form loop of
:mod:`.transcribe` (whose windows go to the batching model service through ``Backend.decode``)
and render the response. Everything that can go wrong becomes OpenAI's error envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from ..transcript import Segment
from ..vocabulary import Vocabulary
from . import formats
from .audio import AudioDecodeError, decode_audio
from .chunked import request_segments
from .longform import (
    SAMPLE_RATE,
    DecodeError,
    DecodeFn,
    FeaturesFn,
    TranscribeOptions,
    TranscriptionInfo,
    to_transcription,
)
from .metrics import metrics
from .protocol import (
    BadRequest,
    GatewayTimeout,
    InternalError,
    Model,
    ModelList,
    NotFound,
    OpenAIError,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    TranscriptionRequest,
    TranscriptTextDelta,
    TranslationRequest,
    Unauthorized,
    UnsupportedMediaType,
    parse_form,
)

log = logging.getLogger(__name__)
CREATED = 1_700_000_000  # a fixed `created` for /v1/models: the model's age is not a fact we have
# BentoML answers a request still running at ``traffic.timeout`` with a 504 of its own whose
# body is not OpenAI's envelope; stop decoding this much earlier and answer in the envelope.
TIMEOUT_MARGIN_S = 1.0
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


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

    @contextlib.contextmanager
    def slot(self, *, check: bool = True) -> Iterator[None]:
        if check and self.active >= self.limit:
            raise RateLimited(
                f"Too many concurrent requests (limit {self.limit}); retry shortly.",
                retry_after=2,
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


@dataclass(frozen=True)
class Backend:
    """What the routes need from the service that hosts them."""

    settings: Settings
    vocab: Vocabulary
    features: FeaturesFn  # one 30 s window of samples -> log-mel features
    decode: DecodeFn  # the batching model service
    admission: Admission

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


def create_app() -> FastAPI:
    """The app; the hosting service sets ``app.state.backend`` once its model is reachable."""
    app = FastAPI(title="bentowhisper", summary="OpenAI-compatible speech to text")
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(_BodyLimit)
    for prefix in ("", "/v1"):
        app.add_api_route(
            f"{prefix}/audio/transcriptions",
            create_transcription,
            methods=["POST"],
            openapi_extra=_multipart_body(translation=False),
        )
        app.add_api_route(
            f"{prefix}/audio/translations",
            create_translation,
            methods=["POST"],
            openapi_extra=_multipart_body(translation=True),
        )
        app.add_api_route(f"{prefix}/models", list_models, methods=["GET"])
        app.add_api_route(f"{prefix}/models/{{model_id:path}}", retrieve_model, methods=["GET"])
    # BentoML answers paths no mounted route matches with a plain-text 404; claim the OpenAI
    # namespaces so that a client of an endpoint we lack (say /v1/audio/speech) gets the envelope.
    for namespace in ("/v1/{rest:path}", "/audio/{rest:path}"):
        app.add_api_route(namespace, unknown_path, methods=_ALL_METHODS, include_in_schema=False)
    return app


def _multipart_body(*, translation: bool) -> dict:
    """The form the routes read by hand (to parse it exactly as the SDK sends it), described
    for /docs and for schema-driven fuzzing."""
    fields: dict[str, dict] = {
        "file": {"type": "string", "format": "binary"},
        "model": {"type": "string", "example": "whisper-1"},
        "prompt": {"type": "string"},
        "response_format": {
            "type": "string",
            "enum": ["json", "text", "srt", "verbose_json", "vtt"],
        },
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    }
    if not translation:
        fields["language"] = {"type": "string"}
        fields["timestamp_granularities[]"] = {
            "type": "array",
            "items": {"type": "string", "enum": ["word", "segment"]},
        }
        fields["stream"] = {"type": "boolean"}
    schema = {"type": "object", "required": ["file", "model"], "properties": fields}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


# --------------------------------------------------------------------------------------------
# Routes


async def create_transcription(request: Request) -> Response:
    """Transcribe audio into the input language (OpenAI's ``audio.transcriptions.create``)."""
    return await _transcribe(request, translation=False)


async def create_translation(request: Request) -> Response:
    """Translate audio into English (OpenAI's ``audio.translations.create``)."""
    return await _transcribe(request, translation=True)


async def list_models(request: Request) -> ModelList:
    backend = _backend(request)
    _authorize(request, backend)
    return ModelList(data=[_model(name) for name in backend.model_names])


async def retrieve_model(request: Request, model_id: str) -> Model:
    backend = _backend(request)
    _authorize(request, backend)
    if model_id not in backend.model_names:
        raise NotFound.model(model_id)
    return _model(model_id)


async def unknown_path(request: Request) -> Response:
    raise NotFound(f"Unknown path: {request.method} {request.url.path}")


def _model(name: str) -> Model:
    return Model(id=name, created=CREATED, owned_by="bentowhisper")


async def _transcribe(request: Request, *, translation: bool) -> Response:
    backend = _backend(request)
    endpoint = "translations" if translation else "transcriptions"
    outcome = {"format": "unknown", "status": 500}
    try:
        response = await _serve(request, backend, translation=translation, outcome=outcome)
        outcome["status"] = response.status_code
        return response
    except OpenAIError as exc:
        outcome["status"] = exc.status_code
        raise
    finally:
        metrics().requests.labels(endpoint, outcome["format"], str(outcome["status"])).inc()


async def _serve(
    request: Request, backend: Backend, *, translation: bool, outcome: dict
) -> Response:
    deadline = time.monotonic() + backend.settings.request_timeout_s - TIMEOUT_MARGIN_S
    _authorize(request, backend)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            "Send the audio as multipart/form-data with a 'file' part.", param="file"
        )
    with backend.admission.slot():
        try:
            async with request.form(max_files=1, max_fields=100) as form:
                params, data = await _read_form(form, backend, translation=translation)
        except HTTPException as exc:  # starlette's multipart errors: too many files, bad framing
            raise BadRequest(f"Could not parse the multipart body: {exc.detail}") from None
        except ClientDisconnect:  # gone mid-upload (or a Content-Length longer than the body)
            raise ClientClosedRequest(
                "The client closed the connection during the upload."
            ) from None
        outcome["format"] = params.response_format
        options = _options(params, backend.vocab, backend.settings.slice_tokens)
        audio = await _decode_upload(data, backend.settings)
        info = TranscriptionInfo(duration=len(audio) / SAMPLE_RATE)
        segments = request_segments(
            audio,
            getattr(params, "chunking_strategy", None),  # translations: the setting decides
            options,
            backend.decode,
            backend.vocab,
            backend.features,
            info,
            backend.settings,
        )
        if isinstance(params, TranscriptionRequest) and params.stream:
            # the stream outlives this handler, so it holds a slot of its own
            return StreamingResponse(
                _stream(segments, info, options, backend), media_type=formats.SSE_MEDIA_TYPE
            )
        await _until_done_or_disconnected(_drain(segments), request, deadline)
        _count(info, options)
    body, media_type = formats.render(to_transcription(info, options), params)
    if isinstance(body, dict):
        return JSONResponse(body)
    return Response(body, media_type=media_type)


async def _drain(segments: AsyncIterator[Segment]) -> None:
    try:
        async for _ in segments:
            pass
    except (OpenAIError, asyncio.CancelledError):
        raise
    except DecodeError as exc:
        raise InternalError(f"The model failed on this audio: {exc}") from None
    except Exception as exc:
        log.exception("model service call failed")
        raise ServiceUnavailable(
            "The model service is unavailable or overloaded; retry shortly.", retry_after=5
        ) from exc


async def _until_done_or_disconnected(
    work: Awaitable[None], request: Request, deadline: float
) -> None:
    """Run the transcription, but stop decoding (before its next model call) as soon as the
    client leaves, the deadline (``time.monotonic()``) passes or this handler is cancelled.

    The client's leaving is awaited as an event, not polled: a decode call can be shorter than
    any poll interval, and one started after the client left is wasted model time."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        remaining = deadline - time.monotonic()
        await asyncio.wait(
            {task, gone}, timeout=max(remaining, 0), return_when=asyncio.FIRST_COMPLETED
        )
        if not task.done():
            if gone.done():
                raise ClientClosedRequest("The client closed the connection.")
            raise GatewayTimeout(
                "The transcription took longer than the server's request time limit and was"
                " stopped; send shorter audio, or retry when the server is less busy."
            )
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    task.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone; the body was read, so nothing else comes first."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _count(info: TranscriptionInfo, options: TranscribeOptions) -> None:
    recorded = metrics()
    recorded.audio_seconds.labels(options.task).inc(info.duration)
    recorded.windows.inc(info.windows)
    recorded.fallbacks.inc(info.fallbacks)


async def _read_form(
    form: FormData, backend: Backend, *, translation: bool
) -> tuple[TranscriptionRequest | TranslationRequest, bytes]:
    params = parse_form(form.multi_items(), translation=translation)
    if params.model not in backend.model_names:
        raise NotFound.model(params.model)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise BadRequest("Missing required parameter: 'file'.", param="file")
    return params, await upload.read()


def _options(
    params: TranscriptionRequest | TranslationRequest, vocab: Vocabulary, slice_tokens: int
) -> TranscribeOptions:
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
        word_timestamps=getattr(params, "word_timestamps", False),
        slice_tokens=slice_tokens or None,
    )


async def _decode_upload(data: bytes, settings: Settings) -> np.ndarray:
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


async def _stream(
    segments: AsyncIterator[Segment],
    info: TranscriptionInfo,
    options: TranscribeOptions,
    backend: Backend,
) -> AsyncIterator[bytes]:
    """Server-sent events: a delta per decoded segment, then the full text with usage.

    Deltas concatenate to the final text, so the first one loses Whisper's leading space.
    """
    with backend.admission.slot(check=False):  # admitted by the handler already
        first = True
        try:
            async for segment in segments:
                delta = segment.text.lstrip() if first else segment.text
                first = False
                yield formats.sse(TranscriptTextDelta(delta=delta))
            _count(info, options)
            yield formats.sse(formats.done_event(to_transcription(info, options)))
        except Exception as exc:  # headers are sent: report in-band, the SDK raises on `error`
            log.exception("streaming transcription failed")
            yield formats.sse(InternalError(f"Transcription failed: {exc}").to_dict())


# --------------------------------------------------------------------------------------------
# Access, limits and errors


def _backend(request: Request) -> Backend:
    backend = getattr(request.app.state, "backend", None)
    if backend is None:
        raise ServiceUnavailable("The service is starting; retry shortly.", retry_after=5)
    return backend


def _authorize(request: Request, backend: Backend) -> None:
    keys = backend.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    # compare against every key, always, so timing says nothing about which prefix matched
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not any(matches):
        raise Unauthorized("Incorrect API key provided." if header else "Missing bearer API key.")


class _BodyLimit:
    """Refuse bodies over the upload limit: at once when Content-Length says so, else as soon
    as the streamed body passes it, never buffering more than the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        backend = scope.get("app") and getattr(scope["app"].state, "backend", None)
        if scope["type"] != "http" or backend is None:
            await self.app(scope, receive, send)
            return
        limit = backend.settings.max_upload_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(PayloadTooLarge(_too_large(limit), param="file"), send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(_too_large(limit), param="file")
            return message

        await self.app(scope, limited, send)


class LineBreakPathNotFound:
    """For the BentoML service around the app: BentoML mounts the app at "/" with a pattern
    that does not match a path holding a line break (``%0A`` in the URL) and answers such a
    path with a plain-text 404 of its own; this answers it in OpenAI's envelope first."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "\n" in scope["path"]:
            await _send_error(NotFound(f"Unknown path: {scope['path']!r}"), send)
            return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> str:
    return f"Maximum content size limit ({limit} bytes) exceeded."


async def _send_error(error: OpenAIError, send: Send) -> None:
    response = _error_response(error)
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


async def _openai_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return _error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(BadRequest(f"Invalid request: {exc}"))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: OpenAIError = NotFound(f"Unknown path: {request.url.path}")
    elif exc.status_code == 405:
        error = BadRequest(f"Method {request.method} not allowed on {request.url.path}")
    else:
        error = BadRequest(str(exc.detail))
    return _error_response(error)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return _error_response(InternalError("The server had an error processing your request."))
