"""The WebSocket endpoint: ``/v1/realtime`` and ``/realtime``, for transcription sessions.

The handshake is refused (HTTP, OpenAI's envelope) for a bad API key, a full worker or a
conversation ``intent``; once accepted, each message goes to the :class:`Session`. Turns are
decoded by the same long-form loop and batching model service as files. The connection ends
when the client leaves (every decode the session started is cancelled), after
``realtime_idle_timeout_s`` without a message, or when a message is over the size limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ...wire import N_FRAMES, DecodeJob
from .. import serving
from ..longform import (
    HOP_LENGTH,
    WINDOW_SAMPLES,
    DecodeError,
    TranscribeOptions,
    window_features,
)
from ..middleware import authorize
from ..protocol import (
    BadRequest,
    OpenAIError,
    RateLimited,
    ServiceUnavailable,
    normalize_language,
)
from .codecs import TARGET_RATE
from .events import EventError, SessionConfig
from .metrics import realtime_metrics
from .session import Limits, Session

log = logging.getLogger(__name__)
KEY_PROTOCOL = "openai-insecure-api-key."  # browsers cannot set headers on a WebSocket
PLAYGROUND = Path(__file__).resolve().parents[1] / "static" / "playground.html"
BETA_HEADER = "realtime=v1"  # OpenAI-Beta: the beta event names and session shape
# Partial hypotheses sample at most this many tokens (speech runs at ~3-4 tokens a second).
PARTIAL_TOKENS_BASE, PARTIAL_TOKENS_PER_S = 8, 6
# A partial encodes its turn rounded up to 5 s steps, not a whole 30 s window: a few lengths,
# so that the partials of sessions at different points of their turns still share batches.
PARTIAL_CONTEXT_STEP = 500  # mel frames


def add_realtime_routes(app: FastAPI) -> None:
    """The WebSocket endpoints, and the playground page that uses them."""
    for prefix in ("", "/v1"):
        app.add_api_websocket_route(f"{prefix}/realtime", realtime_session)
    app.add_api_route("/playground", playground, methods=["GET"], include_in_schema=False)


async def playground() -> FileResponse:
    """A page to try the service: a file upload, or the microphone over /v1/realtime."""
    return FileResponse(PLAYGROUND, media_type="text/html")


class _Capacity:
    """Open sessions in this worker (each holds audio, a VAD state and decodes)."""

    active = 0


async def realtime_session(websocket: WebSocket) -> None:
    """A Realtime transcription session (``GET /v1/realtime?intent=transcription``)."""
    backend = getattr(websocket.app.state, "backend", None)
    recorded = realtime_metrics()
    try:
        if backend is None:
            raise ServiceUnavailable("The service is starting; retry shortly.", retry_after=5)
        authorize(websocket, backend.api_keys, key=_subprotocol_key(websocket))
        intent = websocket.query_params.get("intent", "transcription")
        if intent != "transcription":
            raise BadRequest(
                f"Unsupported intent {intent!r}: this server runs transcription sessions only"
                " (intent=transcription).",
                param="intent",
            )
        limit = backend.settings.realtime_max_sessions
        if _Capacity.active >= limit:
            raise RateLimited(
                f"Too many realtime sessions on this worker (limit {limit}); retry shortly.",
                retry_after=2,
            )
    except OpenAIError as exc:
        recorded.sessions.labels(_refusal(exc)).inc()
        await websocket.send_denial_response(
            JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)
        )
        return
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
    _Capacity.active += 1
    recorded.active.inc()
    try:
        outcome = await _serve(websocket, backend)
    finally:
        _Capacity.active -= 1
        recorded.active.dec()
    recorded.sessions.labels(outcome).inc()


def _refusal(exc: OpenAIError) -> str:
    return {401: "unauthorized", 429: "over_capacity"}.get(exc.status_code, "refused")


def _subprotocol_key(websocket: WebSocket) -> str:
    for protocol in websocket.scope.get("subprotocols") or []:
        if protocol.startswith(KEY_PROTOCOL):
            return protocol[len(KEY_PROTOCOL) :]
    return ""


async def _serve(websocket: WebSocket, backend: Any) -> str:
    settings = backend.settings
    lock = asyncio.Lock()
    closed = asyncio.Event()  # set when the session ends: its turns' requests end with it

    async def send(event: dict[str, Any]) -> None:
        async with lock:  # decodes finish on their own tasks; frames must not interleave
            if websocket.application_state != WebSocketState.CONNECTED:
                return
            try:
                await websocket.send_text(json.dumps(event))
            except Exception:  # the client has gone; the receive loop ends the session
                log.debug("realtime send failed", exc_info=True)

    async def decode(audio: np.ndarray, config: SessionConfig, partial: bool) -> str:
        if partial:
            return await _partial_text(audio, config, backend)
        options = TranscribeOptions(
            language=config.language,
            prompt=config.prompt or None,
            slice_tokens=settings.slice_tokens or None,
        )
        # A committed turn is one request to the serving core, as a file is: admission,
        # deadline, error mapping and metrics (endpoint "realtime").
        try:
            with serving.started(backend, "realtime") as run:
                run.admit()
                done = await run.complete(backend.events(audio, options), closed.wait)
        except OpenAIError as exc:
            raise EventError(
                exc.message, code=exc.code or "transcription_failed", error_type=exc.type
            ) from exc
        return done.transcription.text

    def check(config: SessionConfig) -> SessionConfig:
        if config.model not in backend.model_names:
            raise EventError(
                f"The model {config.model!r} does not exist; this server has"
                f" {', '.join(backend.model_names)}.",
                code="model_not_found",
                param="session.audio.input.transcription.model",
            )
        if config.language:
            try:
                language = normalize_language(config.language)
            except ValueError:
                language = None
            if language not in backend.vocab.languages:
                raise EventError(
                    f"Language {config.language!r} is not supported by the served model.",
                    param="session.audio.input.transcription.language",
                )
            config = replace(config, language=language)
        return config

    session = Session(
        transcribe=decode,
        send=send,
        check=check,
        config=SessionConfig(model=backend.model_names[0]),
        limits=Limits(
            max_turn_s=settings.realtime_max_turn_s,
            partial_interval_s=settings.realtime_partial_interval_ms / 1000,
        ),
        beta=websocket.headers.get("openai-beta", "") == BETA_HEADER,
    )
    max_bytes = int(settings.realtime_max_message_kb * 1024)
    try:
        await session.start()
        while True:
            try:
                message = await asyncio.wait_for(
                    websocket.receive(), timeout=settings.realtime_idle_timeout_s
                )
            except TimeoutError:
                if session.busy:
                    continue  # waiting for its turns' transcripts is not idling
                await session.handle_error(
                    EventError(
                        f"No event for {settings.realtime_idle_timeout_s:g} s; closing the"
                        " session.",
                        code="idle_timeout",
                    )
                )
                await websocket.close(code=1000, reason="idle timeout")
                return "idle_timeout"
            if message["type"] == "websocket.disconnect":
                return "closed"
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            if len(data) > max_bytes:
                await session.handle_error(
                    EventError(
                        f"The message has {len(data)} bytes, over this server's limit of"
                        f" {max_bytes}; it was dropped. Send audio in smaller chunks.",
                        code="message_too_large",
                    )
                )
                continue
            await session.handle(data)
    except WebSocketDisconnect:
        return "closed"
    except Exception:
        log.exception("realtime session failed")
        return "error"
    finally:
        closed.set()
        await session.close()


async def _partial_text(audio: np.ndarray, config: SessionConfig, backend: Any) -> str:
    """A quick hypothesis of a growing turn: one model call on its last 30 s (encoding only
    the frames it fills, rounded up), without timestamps or fallback rounds, its tokens capped
    by the audio's length (a cut-off word can make Whisper repeat itself until the window's
    token limit)."""
    window = audio[-WINDOW_SAMPLES:]
    frames = len(window) // HOP_LENGTH
    steps = -(-(frames + 1) // PARTIAL_CONTEXT_STEP)  # rounded up; + 1: the STFT's last frame
    mel = await asyncio.to_thread(window_features, backend.features, window, frames)
    vocab = backend.vocab
    job = DecodeJob.for_window(
        mel,
        prompt=vocab.encode(" " + config.prompt.strip()) if config.prompt else [],
        language=config.language if vocab.is_multilingual else "en",
        timestamps=False,
        num_frames=frames,
        encode_frames=min(N_FRAMES, steps * PARTIAL_CONTEXT_STEP),
        max_steps=PARTIAL_TOKENS_BASE + int(PARTIAL_TOKENS_PER_S * len(window) / TARGET_RATE),
    )
    (result,) = await backend.lanes.first(backend.decode)([job])
    if result.error:
        raise DecodeError(result.error)
    return vocab.decode(result.tokens).strip()
