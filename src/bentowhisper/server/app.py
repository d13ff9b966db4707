"""The OpenAI-compatible HTTP surface: a FastAPI app that BentoML mounts in the API service.

Thin routes: each parses its request and hands the transcription to :mod:`.serving` (admission,
deadline, disconnects, error mapping, metrics), then renders the events it gets back. What
stands in front of the routes (authentication, upload limit, paths) is in :mod:`.middleware`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from . import diarize, formats, serving
from .audio import SAMPLE_RATE
from .docs import add_docs
from .instance import note_audio
from .longform import SegmentDecoded, TranscriptionDone, TranscriptionEvent
from .middleware import BodyLimit, authorize, error_response
from .protocol import (
    BadRequest,
    InternalError,
    Model,
    ModelList,
    NotFound,
    OpenAIError,
    ServiceUnavailable,
    TranscriptionRequest,
    TranscriptTextDelta,
    TranslationRequest,
    UnsupportedMediaType,
    parse_form,
)
from .realtime.route import add_realtime_routes
from .serving import Backend, ClientClosedRequest, Run

log = logging.getLogger(__name__)
CREATED = 1_700_000_000  # a fixed `created` for /v1/models: the model's age is not a fact we have
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def create_app() -> FastAPI:
    """The app; the hosting service sets ``app.state.backend`` once its model is reachable."""
    # docs_url/redoc_url off: FastAPI's pages load their assets from a CDN (docs.py serves both)
    app = FastAPI(
        title="bentowhisper",
        summary="OpenAI-compatible speech to text",
        docs_url=None,
        redoc_url=None,
    )
    add_docs(app)
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(BodyLimit)
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
    add_realtime_routes(app)  # WebSocket routes; the catch-all below matches HTTP only
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
    authorize(request, backend.api_keys)
    return ModelList(data=[_model(name) for name in backend.model_names])


async def retrieve_model(request: Request, model_id: str) -> Model:
    backend = _backend(request)
    authorize(request, backend.api_keys)
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
    with serving.started(backend, endpoint) as run:
        authorize(request, backend.api_keys)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise UnsupportedMediaType(
                "Send the audio as multipart/form-data with a 'file' part.", param="file"
            )
        run.admit()
        params, data = await _read_form(request, backend, translation=translation)
        run.response_format = params.response_format
        options = serving.request_options(params, backend)
        known = await _known_speakers(params, backend)
        audio = await serving.decode_upload(data, backend.settings)
        note_audio(request.scope, len(audio) / SAMPLE_RATE)
        events = backend.events(audio, options, getattr(params, "chunking_strategy", None))
        speakers = None
        if isinstance(params, TranscriptionRequest) and params.diarize:
            speakers = _Speakers(audio, backend, known)
            events = speakers.events(events)

        async def disconnected() -> None:
            # the body has been read, so the next message can only be the client's leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass

        if isinstance(params, TranscriptionRequest) and params.stream:
            return _EventStream(_sse(run.stream(events, disconnected), params), run)
        done = await run.complete(events, disconnected)
    body, media_type = formats.render(
        done.transcription, params, speakers.found if speakers else None
    )
    if isinstance(body, dict):
        return JSONResponse(body)
    return Response(body, media_type=media_type)


async def _known_speakers(
    params: TranscriptionRequest | TranslationRequest, backend: Backend
) -> dict[str, np.ndarray]:
    """The named reference samples of a diarized_json request, checked before any decoding."""
    if not isinstance(params, TranscriptionRequest) or not params.diarize:
        return {}
    if backend.embed is None:
        raise BadRequest(
            "response_format 'diarized_json' is not available on this server: it runs"
            " without diarization.",
            param="response_format",
        )
    samples = [
        await asyncio.to_thread(diarize.reference_audio, url)
        for url in params.known_speaker_references
    ]
    return dict(zip(params.known_speaker_names, samples, strict=True))


@dataclass(frozen=True)
class SpeakersFound:
    """The transcription's segments by speaker: right before TranscriptionDone, since the
    clustering needs the whole file."""

    segments: list[diarize.SpeakerSegment]


class _Speakers:
    """Diarization as one more step of a request's events, so that the run's deadline,
    disconnect and error mapping cover the encoder's calls too."""

    def __init__(self, audio: np.ndarray, backend: Backend, known: dict[str, np.ndarray]) -> None:
        self.audio = audio
        self.backend = backend
        self.known = known
        self.found: list[diarize.SpeakerSegment] | None = None

    async def events(
        self, events: AsyncIterator[TranscriptionEvent]
    ) -> AsyncIterator[TranscriptionEvent | SpeakersFound]:
        assert self.backend.embed is not None  # checked by _known_speakers
        async with contextlib.aclosing(events):  # a stopped run stops the decoding too
            async for event in events:
                if isinstance(event, TranscriptionDone):
                    self.found = await diarize.speaker_segments(
                        self.audio,
                        event.transcription.segments,
                        self.backend.embed,
                        max_speakers=self.backend.settings.max_speakers,
                        known=self.known,
                    )
                    yield SpeakersFound(self.found)
                yield event


async def _read_form(
    request: Request, backend: Backend, *, translation: bool
) -> tuple[TranscriptionRequest | TranslationRequest, bytes]:
    try:
        async with request.form(max_files=1, max_fields=100) as form:
            return await _parse(form, backend, translation=translation)
    except HTTPException as exc:  # starlette's multipart errors: too many files, bad framing
        raise BadRequest(f"Could not parse the multipart body: {exc.detail}") from None
    except ClientDisconnect:  # gone mid-upload (or a Content-Length longer than the body)
        raise ClientClosedRequest("The client closed the connection during the upload.") from None


async def _parse(
    form: FormData, backend: Backend, *, translation: bool
) -> tuple[TranscriptionRequest | TranslationRequest, bytes]:
    params = parse_form(form.multi_items(), translation=translation)
    if params.model not in backend.model_names:
        raise NotFound.model(params.model)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise BadRequest("Missing required parameter: 'file'.", param="file")
    return params, await upload.read()


async def _sse(
    events: AsyncIterator[TranscriptionEvent | SpeakersFound | OpenAIError],
    params: TranscriptionRequest,
) -> AsyncIterator[bytes]:
    """Server-sent events: a delta per decoded segment (for diarized_json, a
    ``transcript.text.segment`` per speaker segment instead), then the full text with usage; a
    failure as OpenAI's error payload (the SDK raises on it).

    Deltas concatenate to the final text, so the first one loses Whisper's leading space.
    """
    first = True
    async for event in events:
        if isinstance(event, SpeakersFound):
            for segment in event.segments:
                yield formats.sse(formats.diarized_segment(segment))
        elif isinstance(event, SegmentDecoded):
            if params.diarize:  # its segments go out by speaker, once all are known
                continue
            text = event.segment.text
            delta = TranscriptTextDelta(
                delta=text.lstrip() if first else text,
                logprobs=formats.logprobs([event.segment], params),
            )
            yield formats.sse(delta)
            first = False
        elif isinstance(event, TranscriptionDone):
            yield formats.sse(formats.done_event(event.transcription, params))
        else:
            yield formats.sse(event.to_dict())


class _EventStream(StreamingResponse):
    """The SSE response; its request ends with it, also when the client left before the first
    event (then the events were never started, and nothing else would release the slot)."""

    def __init__(self, content: AsyncIterator[bytes], run: Run) -> None:
        super().__init__(content, media_type=formats.SSE_MEDIA_TYPE)
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.finish(ClientClosedRequest.status_code)  # no-op once the stream ended


# --------------------------------------------------------------------------------------------
# Errors


def _backend(request: Request) -> Backend:
    backend = getattr(request.app.state, "backend", None)
    if backend is None:
        raise ServiceUnavailable("The service is starting; retry shortly.", retry_after=5)
    return backend


async def _openai_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(BadRequest(f"Invalid request: {exc}"))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: OpenAIError = NotFound(f"Unknown path: {request.url.path}")
    elif exc.status_code == 405:
        error = BadRequest(f"Method {request.method} not allowed on {request.url.path}")
    else:
        error = BadRequest(str(exc.detail))
    return error_response(error)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(InternalError("The server had an error processing your request."))
