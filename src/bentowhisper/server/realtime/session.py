"""One transcription session: audio in, turns out.

Audio is decoded to 16 kHz as it arrives and kept in an :class:`AudioLog`. With server VAD the
:class:`~bentowhisper.server.vad.SpeechDetector` that chunked files use scores it; a turn starts
when a speech region opens (``prefix_padding_ms`` before its first speech) and ends when the
region closes after ``silence_duration_ms`` without speech, or at ``max_turn_s`` (the region
then goes on as the next turn). With ``turn_detection: null`` the client's ``commit`` ends the
turn. While a turn grows, it is re-decoded at a bounded rate (one decode in flight, at most one
per ``partial_interval_s`` of new audio and of wall time) and the words that the hypotheses
agree on are sent as deltas; the last word of a partial hypothesis is held back, since the
audio may end inside it. A committed turn is decoded once more, in full, for ``completed``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..vad import SpeechDetector, VadParams
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

log = logging.getLogger(__name__)
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less than 100 ms of audio
# Audio kept before an open turn: the detector opens a region up to prefix_padding_ms plus
# 250 ms of speech (its minimum) behind the newest sample, and a chunk may hold a second.
KEEP_BEFORE_TURN_S = 3.0

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


class AudioLog:
    """The session's recent 16 kHz audio, addressed by sample offsets from its first sample."""

    def __init__(self) -> None:
        self.chunks: deque[np.ndarray] = deque()
        self.base = 0  # offset of the first sample kept
        self.end = 0  # offset after the newest sample

    def append(self, samples: np.ndarray) -> None:
        self.chunks.append(samples)
        self.end += len(samples)

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` (a copy); what was trimmed away is left out."""
        parts, offset = [], self.base
        for chunk in self.chunks:
            lo, hi = max(start - offset, 0), min(stop - offset, len(chunk))
            if lo < hi:
                parts.append(chunk[lo:hi])
            offset += len(chunk)
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def trim(self, keep_from: int) -> None:
        """Forget the chunks that end before ``keep_from``."""
        while self.chunks and self.base + len(self.chunks[0]) <= keep_from:
            self.base += len(self.chunks.popleft())


@dataclass
class Turn:
    item_id: str
    start: int  # session offset of the turn's first sample
    emitted: str = ""  # text sent as deltas so far
    partial_end: int = 0  # audio the last partial decode covered (offset)
    partial_started: float = float("-inf")
    partial: asyncio.Task | None = None


class Session:
    def __init__(
        self,
        *,
        transcribe: TranscribeFn,
        send: SendFn,
        check: CheckFn,
        limits: Limits,
        config: SessionConfig | None = None,
        beta: bool = False,
    ) -> None:
        self.transcribe, self.send, self.check = transcribe, send, check
        self.limits, self.beta = limits, beta
        self.id = new_id("sess")
        self.config = check(config or SessionConfig())
        self.decoder = AudioDecoder(self.config.format, self.config.rate)
        self.audio = AudioLog()
        self.vad_base = 0  # session offset of the detector's first sample
        self.detector = self._detector()
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
        changed = config.turn_detection != self.config.turn_detection
        self.config = config
        if changed:
            await self._drop_turn()  # a turn cut by other rules would be neither
            self.detector = self._detector()
        kind = "transcription_session.updated" if self.beta else "session.updated"
        await self.send(server_event(kind, session=self._session_view()))

    def _detector(self) -> SpeechDetector | None:
        """A fresh detector for the audio from now on (its offsets start at ``vad_base``)."""
        vad = self.config.turn_detection
        self.vad_base = self.audio.end
        if vad is None:
            return None
        return SpeechDetector(
            VadParams(vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms)
        )

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
        if self.detector is None:
            self._check_room(len(samples))
            if self.turn is None:
                self.turn = Turn(item_id=new_id("item"), start=self.audio.end)
            self.audio.append(samples)
        else:
            self.audio.append(samples)
            await self._detect(self.detector, samples)
        keep_from = (
            self.turn.start if self.turn else self.audio.end - KEEP_BEFORE_TURN_S * TARGET_RATE
        )
        self.audio.trim(int(keep_from))
        self._maybe_partial()

    def _check_room(self, samples: int) -> None:
        start = self.turn.start if self.turn else self.audio.end
        if self.audio.end + samples - start > self.limits.max_turn_s * TARGET_RATE:
            raise EventError(
                f"The input audio buffer would exceed {self.limits.max_turn_s:g} s; commit"
                " or clear it first. This chunk was dropped.",
                code="input_audio_buffer_too_large",
                param="audio",
            )

    async def _detect(self, detector: SpeechDetector, samples: np.ndarray) -> None:
        base = self.vad_base
        for start, end in detector.feed(samples):
            turn = self.turn or await self._speech_started(base + start)  # opened and closed
            await self._speech_stopped(turn, base + end)
        if self.turn is None and detector.speech_start is not None:
            await self._speech_started(base + detector.speech_start)
        turn = self.turn
        if turn is not None and self.audio.end - turn.start >= self.limits.max_turn_s * TARGET_RATE:
            # The speech goes on: this turn ends here and the next one starts here.
            await self._speech_stopped(turn, self.audio.end)
            await self._speech_started(self.audio.end)

    async def _speech_started(self, start: int) -> Turn:
        turn = self.turn = Turn(item_id=new_id("item"), start=start)
        await self.send(
            server_event(
                "input_audio_buffer.speech_started",
                audio_start_ms=_ms(start),
                item_id=turn.item_id,
            )
        )
        return turn

    async def _speech_stopped(self, turn: Turn, end: int) -> None:
        await self.send(
            server_event(
                "input_audio_buffer.speech_stopped", audio_end_ms=_ms(end), item_id=turn.item_id
            )
        )
        await self._commit(turn, end)

    async def _commit_by_client(self) -> None:
        turn = self.turn
        have = 0 if turn is None else self.audio.end - turn.start
        if turn is None or have < MIN_COMMIT_S * TARGET_RATE:
            have = have / TARGET_RATE * 1000
            raise EventError(
                f"Error committing input audio buffer: buffer too small. Expected at least"
                f" {MIN_COMMIT_S * 1000:.0f}ms of audio, but buffer only has {have:.2f}ms of"
                " audio.",
                code="input_audio_buffer_commit_empty",
            )
        await self._commit(turn, self.audio.end)
        if self.detector is not None:
            self.detector = self._detector()  # the speech region it had open is committed

    async def _commit(self, turn: Turn, end: int) -> None:
        if len(self.finals) >= self.limits.max_pending_turns:
            await self._drop_turn()
            raise EventError(
                f"{len(self.finals)} committed turns are still being transcribed; this turn"
                " was dropped. Commit less often.",
                code="rate_limit_exceeded",
            )
        self.turn = None
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
        audio = self.audio.slice(turn.start, end)
        task = asyncio.create_task(self._final(turn, audio, self.config))
        self.finals.add(task)
        realtime_metrics().tasks.inc()
        task.add_done_callback(self._final_done)

    def _final_done(self, task: asyncio.Task) -> None:
        self.finals.discard(task)
        realtime_metrics().tasks.dec()

    async def _clear(self) -> None:
        await self._drop_turn()
        self.detector = self._detector()  # an open speech region goes with the audio
        self.audio.trim(self.audio.end)
        await self.send(server_event("input_audio_buffer.cleared"))

    async def _drop_turn(self) -> None:
        turn, self.turn = self.turn, None
        if turn is not None and turn.partial is not None:
            turn.partial.cancel()

    # ----------------------------------------------------------------------------------------
    # Decoding

    def _maybe_partial(self) -> None:
        turn, limits = self.turn, self.limits
        if turn is None or turn.partial is not None:
            return
        end = self.audio.end
        if end - turn.start < limits.min_partial_s * TARGET_RATE:
            return
        if turn.partial_end and end - turn.partial_end < limits.partial_interval_s * TARGET_RATE:
            return
        if time.monotonic() - turn.partial_started < limits.partial_interval_s:
            return
        turn.partial_end = end
        turn.partial_started = time.monotonic()
        audio = self.audio.slice(turn.start, end)
        turn.partial = asyncio.create_task(self._partial(turn, audio, self.config))
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
        await self._delta(turn, stable_prefix(text))
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

    async def _final(self, turn: Turn, audio: np.ndarray, config: SessionConfig) -> None:
        seconds = len(audio) / TARGET_RATE
        recorded = realtime_metrics()
        try:
            text = await self.transcribe(audio, config, False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("turn decode failed", exc_info=True)
            recorded.turns.labels("failed").inc()
            known = exc if isinstance(exc, EventError) else None
            error = {
                "type": known.error_type if known else "server_error",
                "code": known.code if known else "transcription_failed",
                "message": known.message if known else f"Transcription failed: {exc}",
                "param": None,
            }
            await self.send(
                server_event(
                    "conversation.item.input_audio_transcription.failed",
                    item_id=turn.item_id,
                    content_index=0,
                    error=error,
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


def stable_prefix(text: str) -> str:
    """The part of a partial hypothesis worth sending: up to where it starts repeating itself,
    and without its last word, which the audio may end inside.

    A partial's encoder sees only a few seconds (``encode_frames``), and on some clips Whisper
    then loops on the phrase it heard ("produced the block, produced the block, ..."). Sent
    words cannot be taken back, so the hypothesis is cut where a run of words repeats the run
    just before it (the last copy may be cut short). A speaker's real repetition is only
    delayed: the next hypotheses, or the completed transcript, carry it.
    """
    words = text.split(" ")
    keys = ["".join(c for c in w.lower() if c.isalnum()) for w in words]
    end = next(
        (i for i in range(1, len(words)) if _repeats_before(keys, i)),
        len(words),
    )
    return " ".join(words[: end - 1])


def _repeats_before(keys: list[str], i: int) -> bool:
    """Whether the words from ``i`` on repeat the ``k`` words before it, for some ``k``: all
    ``k`` of them, or at least two where the text ends inside the copy."""
    for k in range(1, i + 1):
        copy = keys[i : i + k]
        if copy == keys[i - k : i - k + len(copy)] and (len(copy) == k or len(copy) >= 2):
            return True
    return False


def _ms(samples: int) -> int:
    return max(0, samples * 1000 // TARGET_RATE)
