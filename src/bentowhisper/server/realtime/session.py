"""One transcription session: audio in, turns out.

Audio is decoded to 16 kHz as it arrives. With server VAD each 32 ms frame gets a speech
probability; a turn starts at the first speech frame (with ``prefix_padding_ms`` of the audio
before it) and ends after ``silence_duration_ms`` without speech, or at ``max_turn_s``. With
``turn_detection: null`` the client's ``commit`` ends the turn. While a turn grows, it is
re-decoded at a bounded rate (one decode in flight, at most one per ``partial_interval_s`` of
new audio and of wall time) and the words that the hypotheses agree on are sent as deltas; the
last word of a partial hypothesis is held back, since the audio may end inside it. A committed
turn is decoded once more, in full, for ``completed``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codecs import TARGET_RATE, AudioDecoder
from .events import (
    EventError,
    SessionConfig,
    apply_update,
    error_event,
    new_id,
    parse_client_event,
    server_event,
)
from .metrics import realtime_metrics
from .vad import FRAME_SAMPLES, FrameVad

log = logging.getLogger(__name__)
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less than 100 ms of audio
VAD_HYSTERESIS = 0.15  # speech continues while the probability stays above threshold - this

# (16 kHz audio, config, partial?) -> text; partial decodes skip the temperature fallback.
TranscribeFn = Callable[[np.ndarray, SessionConfig, bool], Awaitable[str]]
SendFn = Callable[[dict[str, Any]], Awaitable[None]]
CheckFn = Callable[[SessionConfig], SessionConfig]  # validate/normalise, or raise EventError


@dataclass(frozen=True)
class Limits:
    max_turn_s: float = 30.0  # longest turn (server VAD cuts it) and buffer (manual)
    partial_interval_s: float = 0.7
    min_partial_s: float = 1.0  # no partial decode of less audio (prefix padding included)
    max_pending_turns: int = 4  # committed turns still decoding, per session


@dataclass
class Turn:
    item_id: str
    start_sample: int  # session position of the turn's first sample
    chunks: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    emitted: str = ""  # text sent as deltas so far
    partial_samples: int = 0  # audio the last partial decode covered
    partial_started: float = float("-inf")
    partial: asyncio.Task | None = None

    def add(self, samples: np.ndarray) -> None:
        self.chunks.append(samples)
        self.samples += len(samples)

    def audio(self) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros(0, np.float32)


class Session:
    def __init__(
        self,
        *,
        transcribe: TranscribeFn,
        send: SendFn,
        check: CheckFn,
        vad: Callable[[], FrameVad],
        limits: Limits,
        config: SessionConfig | None = None,
        beta: bool = False,
    ) -> None:
        self.transcribe, self.send, self.check = transcribe, send, check
        self.make_vad, self.limits, self.beta = vad, limits, beta
        self.id = new_id("sess")
        self.config = check(config or SessionConfig())
        self.decoder = AudioDecoder(self.config.format, self.config.rate)
        self.vad: FrameVad = vad()
        self.position = 0  # samples (16 kHz) received in this session
        self.frame_rest = np.zeros(0, np.float32)  # samples short of a whole VAD frame
        self.preroll = np.zeros(0, np.float32)  # recent audio before speech (prefix padding)
        self.silence = 0  # samples of non-speech at the end of the current turn
        self.turn: Turn | None = None
        self.previous_item: str | None = None
        self.finals: set[asyncio.Task] = set()

    # ----------------------------------------------------------------------------------------
    # Client events

    async def start(self) -> None:
        kind = "transcription_session.created" if self.beta else "session.created"
        await self.send(server_event(kind, session=self._session_view()))

    async def handle(self, message: str | bytes) -> None:
        """Apply one client message; a bad one is answered with an ``error`` event."""
        event_id = None
        try:
            event = parse_client_event(message)
            event_id = event.get("event_id")
            kind = event["type"]
            if kind in ("session.update", "transcription_session.update"):
                await self._update(event)
            elif kind == "input_audio_buffer.append":
                await self._append(event)
            elif kind == "input_audio_buffer.commit":
                await self._commit_by_client()
            else:
                await self._clear()
        except EventError as exc:
            exc.event_id = exc.event_id or (event_id if isinstance(event_id, str) else None)
            await self.handle_error(exc)

    async def handle_error(self, exc: EventError) -> None:
        """Tell the client what was wrong with an event; the session goes on."""
        realtime_metrics().errors.labels(exc.code).inc()
        await self.send(error_event(exc))

    @property
    def busy(self) -> bool:
        """A decode of this session's audio is running."""
        return bool(self.finals) or (self.turn is not None and self.turn.partial is not None)

    async def close(self) -> None:
        """Stop every decode this session started (the client has gone)."""
        tasks = [*self.finals, *([self.turn.partial] if self.turn and self.turn.partial else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _update(self, event: dict[str, Any]) -> None:
        self.beta = self.beta or event["type"] == "transcription_session.update"
        config = self.check(apply_update(self.config, event))
        if (config.format, config.rate) != (self.config.format, self.config.rate):
            self.decoder = AudioDecoder(config.format, config.rate)
        if config.turn_detection != self.config.turn_detection and self.turn is not None:
            await self._drop_turn()  # a turn cut by other rules would be neither
        self.config = config
        kind = "transcription_session.updated" if self.beta else "session.updated"
        await self.send(server_event(kind, session=self._session_view()))

    def _session_view(self) -> dict[str, Any]:
        return self.config.beta(self.id) if self.beta else self.config.ga(self.id)

    async def _append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise EventError(
                "Missing required parameter: 'audio' (base64 audio bytes).",
                code="missing_required_parameter",
                param="audio",
            )
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("'audio' is not valid base64.", param="audio") from None
        samples = self.decoder(data)
        if self.config.turn_detection is None:
            await self._append_manual(samples)
        else:
            await self._append_vad(samples)
        self._maybe_partial()

    async def _append_manual(self, samples: np.ndarray) -> None:
        turn = self.turn
        limit = int(self.limits.max_turn_s * TARGET_RATE)
        if turn is not None and turn.samples + len(samples) > limit:
            raise EventError(
                f"The input audio buffer would exceed {self.limits.max_turn_s:g} s; commit"
                " or clear it first. This chunk was dropped.",
                code="input_audio_buffer_too_large",
                param="audio",
            )
        if turn is None:
            turn = self.turn = Turn(item_id=new_id("item"), start_sample=self.position)
        turn.add(samples)
        self.position += len(samples)

    async def _append_vad(self, samples: np.ndarray) -> None:
        vad = self.config.turn_detection
        assert vad is not None
        pending = np.concatenate([self.frame_rest, samples])
        whole = len(pending) - len(pending) % FRAME_SAMPLES
        self.frame_rest = pending[whole:]
        pad = int(vad.prefix_padding_ms * TARGET_RATE / 1000)
        silence_limit = int(vad.silence_duration_ms * TARGET_RATE / 1000)
        for start in range(0, whole, FRAME_SAMPLES):
            frame = pending[start : start + FRAME_SAMPLES]
            prob = self.vad(frame)
            self.position += FRAME_SAMPLES
            turn = self.turn
            if turn is None:
                if prob >= vad.threshold:
                    await self._speech_started(frame)
                else:
                    self.preroll = (
                        np.concatenate([self.preroll, frame])[-pad:] if pad else frame[:0]
                    )
                continue
            turn.add(frame)
            self.silence = (
                0 if prob >= vad.threshold - VAD_HYSTERESIS else self.silence + len(frame)
            )
            too_long = turn.samples >= self.limits.max_turn_s * TARGET_RATE
            if self.silence >= silence_limit or too_long:
                end_ms = _ms(self.position - self.silence)
                await self.send(
                    server_event(
                        "input_audio_buffer.speech_stopped",
                        audio_end_ms=end_ms,
                        item_id=turn.item_id,
                    )
                )
                await self._commit(turn)

    async def _speech_started(self, frame: np.ndarray) -> None:
        start = self.position - FRAME_SAMPLES - len(self.preroll)
        turn = self.turn = Turn(item_id=new_id("item"), start_sample=start)
        turn.add(self.preroll)
        turn.add(frame)
        self.preroll = frame[:0]
        self.silence = 0
        await self.send(
            server_event(
                "input_audio_buffer.speech_started",
                audio_start_ms=_ms(start),
                item_id=turn.item_id,
            )
        )

    async def _commit_by_client(self) -> None:
        turn = self.turn
        if turn is None or turn.samples < MIN_COMMIT_S * TARGET_RATE:
            have = 0.0 if turn is None else turn.samples / TARGET_RATE * 1000
            raise EventError(
                f"Error committing input audio buffer: buffer too small. Expected at least"
                f" {MIN_COMMIT_S * 1000:.0f}ms of audio, but buffer only has {have:.2f}ms of"
                " audio.",
                code="input_audio_buffer_commit_empty",
            )
        await self._commit(turn)

    async def _commit(self, turn: Turn) -> None:
        if len(self.finals) >= self.limits.max_pending_turns:
            await self._drop_turn()
            raise EventError(
                f"{len(self.finals)} committed turns are still being transcribed; this turn"
                " was dropped. Commit less often.",
                code="rate_limit_exceeded",
            )
        self.turn = None
        self.silence = 0
        if turn.partial is not None:
            turn.partial.cancel()  # the full decode below supersedes it
        await self.send(
            server_event(
                "input_audio_buffer.committed",
                item_id=turn.item_id,
                previous_item_id=self.previous_item,
            )
        )
        self.previous_item = turn.item_id
        task = asyncio.create_task(self._final(turn, self.config))
        self.finals.add(task)
        realtime_metrics().tasks.inc()
        task.add_done_callback(self._final_done)

    def _final_done(self, task: asyncio.Task) -> None:
        self.finals.discard(task)
        realtime_metrics().tasks.dec()

    async def _clear(self) -> None:
        await self._drop_turn()
        self.frame_rest = self.frame_rest[:0]
        self.preroll = self.preroll[:0]
        await self.send(server_event("input_audio_buffer.cleared"))

    async def _drop_turn(self) -> None:
        turn, self.turn = self.turn, None
        self.silence = 0
        if turn is not None and turn.partial is not None:
            turn.partial.cancel()

    # ----------------------------------------------------------------------------------------
    # Decoding

    def _maybe_partial(self) -> None:
        turn, limits = self.turn, self.limits
        if turn is None or turn.partial is not None:
            return
        step = limits.partial_interval_s * TARGET_RATE
        if turn.samples < limits.min_partial_s * TARGET_RATE:
            return
        if turn.partial_samples and turn.samples - turn.partial_samples < step:
            return
        if time.monotonic() - turn.partial_started < limits.partial_interval_s:
            return
        turn.partial_samples = turn.samples
        turn.partial_started = time.monotonic()
        turn.partial = asyncio.create_task(self._partial(turn, turn.audio(), self.config))
        realtime_metrics().tasks.inc()
        turn.partial.add_done_callback(lambda _: realtime_metrics().tasks.dec())

    async def _partial(self, turn: Turn, audio: np.ndarray, config: SessionConfig) -> None:
        try:
            text = await self.transcribe(audio, config, True)
            realtime_metrics().partials.inc()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("partial decode failed", exc_info=True)
            text = ""
        finally:
            turn.partial = None
        if self.turn is not turn:
            return  # committed or dropped meanwhile: the final decode speaks for it
        cut = text.rfind(" ")
        await self._delta(turn, text[:cut] if cut > 0 else "")
        self._maybe_partial()  # audio that came in during this decode

    async def _delta(self, turn: Turn, text: str) -> None:
        # Deltas concatenate to the text so far; a hypothesis that revises sent words waits
        # until one agrees with them again (or for the completed transcript).
        if len(text) > len(turn.emitted) and text.startswith(turn.emitted):
            delta, turn.emitted = text[len(turn.emitted) :], text
            await self.send(
                server_event(
                    "conversation.item.input_audio_transcription.delta",
                    item_id=turn.item_id,
                    content_index=0,
                    delta=delta,
                )
            )

    async def _final(self, turn: Turn, config: SessionConfig) -> None:
        audio = turn.audio()
        seconds = len(audio) / TARGET_RATE
        recorded = realtime_metrics()
        try:
            text = await self.transcribe(audio, config, False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("turn decode failed", exc_info=True)
            recorded.turns.labels("failed").inc()
            error = {"type": "server_error", "code": "transcription_failed", "param": None}
            await self.send(
                server_event(
                    "conversation.item.input_audio_transcription.failed",
                    item_id=turn.item_id,
                    content_index=0,
                    error={**error, "message": f"Transcription failed: {exc}"},
                )
            )
            return
        await self._delta(turn, text)
        recorded.turns.labels("completed").inc()
        recorded.turn_audio_seconds.inc(seconds)
        await self.send(
            server_event(
                "conversation.item.input_audio_transcription.completed",
                item_id=turn.item_id,
                content_index=0,
                transcript=text,
                usage={"type": "duration", "seconds": round(seconds, 3)},
            )
        )


def _ms(samples: int) -> int:
    return max(0, samples * 1000 // TARGET_RATE)
