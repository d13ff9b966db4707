"""The events of OpenAI's Realtime transcription sessions, as pydantic models.

Client events are validated here; anything wrong becomes a :class:`EventError`, which the
session answers with an ``error`` event and then carries on. Both the GA shape
(``session.update`` with ``session.audio.input...``) and the beta one
(``transcription_session.update`` with ``input_audio_format``, ``input_audio_transcription``)
are read into one :class:`SessionConfig`; replies use the names and shape the client spoke.
"""

from __future__ import annotations

import itertools
import json
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

LOGPROBS_INCLUDE = "item.input_audio_transcription.logprobs"
# Beta format names; their PCM is 24 kHz and G.711 is 8 kHz, as in the GA formats.
BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
PCM_RATES = (8000, 16000, 24000, 48000)  # OpenAI takes 24 kHz only; the others cost nothing


class EventError(Exception):
    """A client event that cannot be applied; sent back as an ``error`` event."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_value",
        param: str | None = None,
        event_id: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param
        self.event_id, self.error_type = event_id, error_type


# --------------------------------------------------------------------------------------------
# Session configuration


@dataclass(frozen=True)
class ServerVad:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def to_dict(self) -> dict[str, Any]:
        return {"type": "server_vad", **self.__dict__}


@dataclass(frozen=True)
class SessionConfig:
    format: str = "audio/pcm"
    rate: int = 24000
    model: str = "whisper-1"
    language: str | None = None
    prompt: str | None = None
    turn_detection: ServerVad | None = field(default_factory=ServerVad)
    noise_reduction: dict[str, Any] | None = None  # accepted and reported, not applied
    include: tuple[str, ...] = ()

    def ga(self, session_id: str) -> dict[str, Any]:
        fmt = {"type": self.format, **({"rate": self.rate} if self.format == "audio/pcm" else {})}
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": session_id,
            "audio": {
                "input": {
                    "format": fmt,
                    "noise_reduction": self.noise_reduction,
                    "transcription": self._transcription(),
                    "turn_detection": self._turn_detection(),
                }
            },
            "include": list(self.include),
        }

    def beta(self, session_id: str) -> dict[str, Any]:
        names = {v: k for k, v in BETA_FORMATS.items()}
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "input_audio_format": names[self.format],
            "input_audio_transcription": self._transcription(),
            "turn_detection": self._turn_detection(),
            "input_audio_noise_reduction": self.noise_reduction,
            "include": list(self.include),
            "modalities": ["text"],
        }

    def _transcription(self) -> dict[str, Any]:
        return {"model": self.model, "language": self.language, "prompt": self.prompt or ""}

    def _turn_detection(self) -> dict[str, Any] | None:
        return self.turn_detection.to_dict() if self.turn_detection else None


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI does


class _Closed(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TurnDetectionIn(_Closed):
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(None, ge=0, le=10_000)


class TranscriptionIn(_Closed):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class FormatIn(_Closed):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
    rate: int | None = None


class NoiseReductionIn(_Closed):
    type: Literal["near_field", "far_field"] | None = None


class AudioInputIn(_Closed):
    format: FormatIn | None = None
    noise_reduction: NoiseReductionIn | None = None
    transcription: TranscriptionIn | None = None
    turn_detection: TurnDetectionIn | None = None


class AudioIn(_Closed):
    input: AudioInputIn | None = None


class GASessionIn(_Closed):
    type: Literal["transcription"] = "transcription"
    audio: AudioIn | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None


class BetaSessionIn(_Closed):
    input_audio_format: Literal["pcm16", "g711_ulaw", "g711_alaw"] | None = None
    input_audio_transcription: TranscriptionIn | None = None
    turn_detection: TurnDetectionIn | None = None
    input_audio_noise_reduction: NoiseReductionIn | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None


def _turn(old: ServerVad | None, new: TurnDetectionIn | None, param: str) -> ServerVad | None:
    if new is None:
        return None
    if new.type == "semantic_vad":
        raise EventError(
            "turn_detection type 'semantic_vad' is not supported; use 'server_vad' or null.",
            param=param,
        )
    base = old or ServerVad()
    given = new.model_dump(exclude_none=True, exclude={"type"})
    return replace(base, **given)


def _transcription(config: SessionConfig, new: TranscriptionIn | None) -> SessionConfig:
    if new is None:
        return config
    given = new.model_dump(exclude_unset=True)
    return replace(config, **given)


def apply_update(config: SessionConfig, event: dict[str, Any]) -> SessionConfig:
    """``config`` with a ``session.update`` or ``transcription_session.update`` applied;
    fields the event leaves out keep their values, an explicit null ``turn_detection`` turns
    server VAD off."""
    raw = event.get("session")
    if not isinstance(raw, dict):
        raise EventError(
            "Missing required parameter: 'session'.",
            param="session",
            code="missing_required_parameter",
        )
    try:
        if event["type"] == "transcription_session.update" or (
            "audio" not in raw and bool(raw.keys() & BetaSessionIn.model_fields.keys())
        ):
            return _apply_beta(config, BetaSessionIn.model_validate(raw), raw)
        session = GASessionIn.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in ("session", *first["loc"]))
        raise EventError(f"Invalid value for '{where}': {first['msg']}.", param=where) from None
    if raw.get("type") not in (None, "transcription"):
        raise EventError(
            "This endpoint serves transcription sessions: session.type must be 'transcription'.",
            param="session.type",
        )
    audio_input = session.audio.input if session.audio else None
    if session.include is not None:
        config = replace(config, include=tuple(session.include))
    if audio_input is None:
        return config
    given = audio_input.model_fields_set
    if audio_input.format is not None:
        config = _format(config, audio_input.format.type, audio_input.format.rate)
    if "noise_reduction" in given:
        config = replace(config, noise_reduction=_noise(audio_input.noise_reduction))
    config = _transcription(config, audio_input.transcription)
    if "turn_detection" in given:
        config = replace(
            config,
            turn_detection=_turn(
                config.turn_detection,
                audio_input.turn_detection,
                "session.audio.input.turn_detection",
            ),
        )
    return config


def _apply_beta(config: SessionConfig, session: BetaSessionIn, raw: dict) -> SessionConfig:
    if session.input_audio_format is not None:
        config = _format(config, BETA_FORMATS[session.input_audio_format], None)
    if "input_audio_noise_reduction" in raw:
        config = replace(config, noise_reduction=_noise(session.input_audio_noise_reduction))
    if session.include is not None:
        config = replace(config, include=tuple(session.include))
    config = _transcription(config, session.input_audio_transcription)
    if "turn_detection" in raw:
        config = replace(
            config,
            turn_detection=_turn(
                config.turn_detection, session.turn_detection, "session.turn_detection"
            ),
        )
    return config


def _format(config: SessionConfig, kind: str, rate: int | None) -> SessionConfig:
    if kind == "audio/pcm":
        rate = rate or 24000
        if rate not in PCM_RATES:
            raise EventError(
                f"Unsupported audio/pcm rate {rate}; supported: {', '.join(map(str, PCM_RATES))}.",
                param="session.audio.input.format.rate",
            )
        return replace(config, format=kind, rate=rate)
    return replace(config, format=kind, rate=8000)


def _noise(value: NoiseReductionIn | None) -> dict[str, Any] | None:
    return None if value is None or value.type is None else {"type": value.type}


# --------------------------------------------------------------------------------------------
# Client events

CLIENT_EVENTS = (
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)


def parse_client_event(message: str | bytes) -> dict[str, Any]:
    """A client message as a dict with a known ``type``, else :class:`EventError`."""
    try:
        event = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        raise EventError("The message is not valid JSON.", code="invalid_json") from None
    if not isinstance(event, dict):
        raise EventError("An event must be a JSON object.", code="invalid_json")
    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
    kind = event.get("type")
    if kind not in CLIENT_EVENTS:
        raise EventError(
            f"Invalid value: {kind!r}. Supported values are: {', '.join(CLIENT_EVENTS)}.",
            code="invalid_value",
            param="type",
            event_id=event_id,
        )
    return event


# --------------------------------------------------------------------------------------------
# Server events


_counter = itertools.count()


def new_id(prefix: str) -> str:
    """An id like OpenAI's (``event_...``, ``item_...``): random, unique in this process."""
    return f"{prefix}_{secrets.token_hex(6)}{next(_counter):x}"


def server_event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": new_id("event"), "type": kind, **fields}


def error_event(error: EventError) -> dict[str, Any]:
    return server_event(
        "error",
        error={
            "type": error.error_type,
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "event_id": error.event_id,
        },
    )
