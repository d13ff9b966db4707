"""OpenAI audio API protocol: request and response types, form parsing and error envelopes.

Kept apart from the serving code (like vLLM's ``protocol.py``) so that it depends on pydantic
only. Field names and shapes follow the official ``openai`` SDK, which must round-trip every call
unchanged; see ``docs/openai-contract.md`` in the shared docs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
TimestampGranularity = Literal["word", "segment"]
Include = Literal["logprobs"]

# Whisper's own language table (openai-whisper ``tokenizer.LANGUAGES``), in language-token order.
# ``verbose_json`` reports these full lower-case names, not the codes.
LANGUAGES: dict[str, str] = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "ca": "catalan",
    "nl": "dutch",
    "ar": "arabic",
    "sv": "swedish",
    "it": "italian",
    "id": "indonesian",
    "hi": "hindi",
    "fi": "finnish",
    "vi": "vietnamese",
    "he": "hebrew",
    "uk": "ukrainian",
    "el": "greek",
    "ms": "malay",
    "cs": "czech",
    "ro": "romanian",
    "da": "danish",
    "hu": "hungarian",
    "ta": "tamil",
    "no": "norwegian",
    "th": "thai",
    "ur": "urdu",
    "hr": "croatian",
    "bg": "bulgarian",
    "lt": "lithuanian",
    "la": "latin",
    "mi": "maori",
    "ml": "malayalam",
    "cy": "welsh",
    "sk": "slovak",
    "te": "telugu",
    "fa": "persian",
    "lv": "latvian",
    "bn": "bengali",
    "sr": "serbian",
    "az": "azerbaijani",
    "sl": "slovenian",
    "kn": "kannada",
    "et": "estonian",
    "mk": "macedonian",
    "br": "breton",
    "eu": "basque",
    "is": "icelandic",
    "hy": "armenian",
    "ne": "nepali",
    "mn": "mongolian",
    "bs": "bosnian",
    "kk": "kazakh",
    "sq": "albanian",
    "sw": "swahili",
    "gl": "galician",
    "mr": "marathi",
    "pa": "punjabi",
    "si": "sinhala",
    "km": "khmer",
    "sn": "shona",
    "yo": "yoruba",
    "so": "somali",
    "af": "afrikaans",
    "oc": "occitan",
    "ka": "georgian",
    "be": "belarusian",
    "tg": "tajik",
    "sd": "sindhi",
    "gu": "gujarati",
    "am": "amharic",
    "yi": "yiddish",
    "lo": "lao",
    "uz": "uzbek",
    "fo": "faroese",
    "ht": "haitian creole",
    "ps": "pashto",
    "tk": "turkmen",
    "nn": "nynorsk",
    "mt": "maltese",
    "sa": "sanskrit",
    "lb": "luxembourgish",
    "my": "myanmar",
    "bo": "tibetan",
    "tl": "tagalog",
    "mg": "malagasy",
    "as": "assamese",
    "tt": "tatar",
    "haw": "hawaiian",
    "ln": "lingala",
    "ha": "hausa",
    "ba": "bashkir",
    "jw": "javanese",
    "su": "sundanese",
    "yue": "cantonese",
}

# Full names (and openai-whisper's aliases) accepted in place of a code.
LANGUAGE_CODES: dict[str, str] = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}


def normalize_language(value: str) -> str:
    """Return Whisper's code for a code or full name, case-insensitively; ValueError if unknown."""
    key = value.strip().lower()
    if key in LANGUAGES:
        return key
    if key in LANGUAGE_CODES:
        return LANGUAGE_CODES[key]
    raise ValueError(f"unsupported language {value!r}")


# --------------------------------------------------------------------------------------------
# Requests


MAX_KNOWN_SPEAKERS = 4  # OpenAI's limit on known_speaker_names[]
# A base64 data URL (RFC 2397): media type and parameters, then the payload.
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[^;,]*)*;base64,[A-Za-z0-9+/=\s]+$")


class ServerVadChunking(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["server_vad"]
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(default=None, ge=0)
    silence_duration_ms: int | None = Field(default=None, ge=0)


def _chunking_kind(value: Any) -> str:
    # Route a string to the literals and anything else to the object, so a bad threshold
    # is reported as such instead of as "input should be 'auto'".
    return "text" if isinstance(value, str) else "server_vad"


# "none" is this server's own value (OpenAI has no such string): the sequential loop, for a
# request that wants it where the `chunking` setting chunks requests by default.
ChunkingStrategy = Annotated[
    Annotated[Literal["auto", "none"], Tag("text")]
    | Annotated[ServerVadChunking, Tag("server_vad")],
    Discriminator(_chunking_kind),
]


class _AudioRequest(BaseModel):
    """Fields that transcriptions and translations share; the ``file`` part is the caller's."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str | None = None
    response_format: ResponseFormat = "json"
    # 0 means greedy decoding with Whisper's temperature fallback, not a single greedy pass.
    temperature: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)


class TranslationRequest(_AudioRequest):
    """``POST /v1/audio/translations``: always English output, no language, no streaming."""


class TranscriptionRequest(_AudioRequest):
    """``POST /v1/audio/transcriptions``."""

    # Only transcriptions diarize; redeclared here, it keeps its place before the validators'.
    response_format: ResponseFormat | Literal["diarized_json"] = "json"
    language: str | None = None  # normalised to Whisper's code; None means detect
    # Declared after response_format, so the validator below can see it.
    timestamp_granularities: list[TimestampGranularity] = Field(default_factory=lambda: ["segment"])
    stream: bool = False
    # ["logprobs"]: json and stream events carry each text token's log-probability.
    include: list[Include] = Field(default_factory=list)
    chunking_strategy: ChunkingStrategy | None = None
    # Diarization (transcriptions only): speakers named by 2-10 s samples of their voice. The
    # references come first so the names' validator (run even when no names are sent) sees them.
    known_speaker_references: list[str] = Field(default_factory=list, max_length=MAX_KNOWN_SPEAKERS)
    known_speaker_names: list[str] = Field(
        default_factory=list, max_length=MAX_KNOWN_SPEAKERS, validate_default=True
    )

    @field_validator("known_speaker_references")
    @classmethod
    def _data_urls(cls, value: list[str]) -> list[str]:
        for reference in value:
            if not _DATA_URL.match(reference):
                raise PydanticCustomError(
                    "not_a_data_url",
                    "each reference must be a base64 data URL of audio "
                    "('data:audio/wav;base64,...')",
                )
        return value

    @field_validator("known_speaker_names")
    @classmethod
    def _one_name_per_reference(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if "known_speaker_references" not in info.data:  # already reported
            return value
        references = info.data["known_speaker_references"]
        if len(set(value)) != len(value):
            raise PydanticCustomError("duplicate_speaker_names", "the names must be distinct")
        if value and not references:
            raise PydanticCustomError(
                "names_without_references",
                "known_speaker_references[] must give one audio sample per name",
            )
        if len(value) != len(references):
            raise PydanticCustomError(
                "references_without_names",
                "one name is needed per known_speaker_references[] entry "
                "({references} references, {names} names)",
                {"references": len(references), "names": len(value)},
            )
        return value

    @property
    def diarize(self) -> bool:
        return self.response_format == "diarized_json"

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return normalize_language(value)
        except ValueError:
            raise PydanticCustomError(
                "unsupported_language",
                "not a language Whisper knows; use an ISO-639-1 code such as 'en'",
            ) from None

    @field_validator("timestamp_granularities")
    @classmethod
    def _words_need_verbose_json(
        cls, value: list[TimestampGranularity], info: ValidationInfo
    ) -> list[TimestampGranularity]:
        # Only verbose_json can carry word timestamps, so asking for them in another format is a
        # client mistake worth a 400. "segment" alone is the default and changes nothing, so it
        # is accepted with any format (clients often send it unconditionally).
        response_format = info.data.get("response_format")
        if "word" in value and response_format is not None and response_format != "verbose_json":
            raise PydanticCustomError(
                "granularity_needs_verbose_json",
                "'word' requires response_format=verbose_json",
            )
        return value

    @property
    def word_timestamps(self) -> bool:
        return "word" in self.timestamp_granularities


# Wire form keys: ``name``, ``name[]`` (repeated arrays), ``name[3]`` and ``name[key]`` (objects).
_FORM_KEY = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?P<sub>[A-Za-z0-9_]*)\])?$")
_LIST_FIELDS = frozenset(
    {"timestamp_granularities", "include", "known_speaker_names", "known_speaker_references"}
)
_NO_COMMA_SPLIT = frozenset({"known_speaker_references"})  # a data URL has a comma
_OBJECT_FIELDS = frozenset({"chunking_strategy"})


def parse_form(
    items: Iterable[tuple[str, object]], *, translation: bool = False
) -> TranscriptionRequest | TranslationRequest:
    """Build a request from multipart form items exactly as the openai SDK encodes them.

    ``items`` are (key, value) pairs in wire order, e.g. starlette's ``FormData.multi_items()``.
    Values that are not strings (the ``file`` upload) are skipped, as are unknown keys, which is
    how ``extra_body`` parameters this server does not know about end up ignored. An empty
    string counts as not given (HTML forms and ``curl -F x=`` send those). Raises ``BadRequest``.
    """
    model_cls = TranslationRequest if translation else TranscriptionRequest
    fields = model_cls.model_fields
    data: dict[str, Any] = {}
    for key, value in items:
        match = _FORM_KEY.match(key)
        if match is None or not isinstance(value, str) or not value.strip():
            continue
        name, sub = match["name"], match["sub"]
        if name not in fields:
            continue
        if name in _LIST_FIELDS:
            # ``name[]=a`` repeated (the SDK) or ``name=a,b`` / ``name=a`` repeated (others).
            parts = [value] if sub is not None or name in _NO_COMMA_SPLIT else value.split(",")
            data.setdefault(name, []).extend(part.strip() for part in parts if part.strip())
        elif name in _OBJECT_FIELDS:
            if sub:  # chunking_strategy[threshold]=0.5
                if not isinstance(data.get(name), dict):
                    data[name] = {}
                data[name][sub] = value
            else:  # chunking_strategy=auto, or the object as JSON (curl, other SDKs)
                data[name] = _json_object_or_text(value)
        elif sub is None:
            data[name] = value  # a repeated scalar: the last one wins, as in starlette
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise bad_request_from_validation(exc) from exc


def _json_object_or_text(value: str) -> object:
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass  # reported by validation as the string it is
    return value


# --------------------------------------------------------------------------------------------
# Errors


class OpenAIError(Exception):
    """An error served as OpenAI's envelope; subclasses fix the status, type and default code."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    default_message: ClassVar[str] = "The server had an error while processing your request."

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.param = param
        self.code = code if code is not None else self.default_code
        # Retry-After takes whole seconds; the SDK honours it when deciding its backoff.
        self.headers = (
            None if retry_after is None else {"Retry-After": str(max(0, math.ceil(retry_after)))}
        )
        super().__init__(self.message)

    @property
    def type(self) -> str:
        return self.error_type

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        # All four keys always, param and code as null when unset: the SDK reads them by name.
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(OpenAIError):
    status_code = 400
    error_type = "invalid_request_error"
    default_message = "The request is invalid."


class Unauthorized(OpenAIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"
    default_message = "Incorrect API key provided."


class NotFound(OpenAIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_message = "Not found."

    @classmethod
    def model(cls, name: str) -> NotFound:
        return cls(
            f"The model '{name}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


class PayloadTooLarge(OpenAIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_message = "The uploaded file is too large."


class UnsupportedMediaType(OpenAIError):
    status_code = 415
    error_type = "invalid_request_error"
    default_message = "The request must be multipart/form-data."


class RateLimited(OpenAIError):
    status_code = 429
    error_type = "requests"  # OpenAI's type for request-rate limits
    default_code = "rate_limit_exceeded"
    default_message = "Too many requests; retry later."


class ServiceUnavailable(OpenAIError):
    status_code = 503
    error_type = "server_error"
    default_message = "The server is overloaded or not ready yet; retry later."


class InternalError(OpenAIError):
    status_code = 500
    error_type = "server_error"


class GatewayTimeout(OpenAIError):
    status_code = 504
    error_type = "server_error"
    default_message = "The request took longer than the server's time limit and was stopped."


def bad_request_from_validation(exc: ValidationError) -> BadRequest:
    """Turn pydantic's first error into OpenAI's 400, ``param`` being the wire field name."""
    error = exc.errors(include_url=False)[0]
    loc = error["loc"]
    param = str(loc[0]) if loc else None
    if error["type"] == "missing":
        return BadRequest(f"Missing required parameter: '{param}'.", param=param)
    # For a list item or a chunking_strategy field the input is that item, so the message
    # still shows the exact offending value.
    shown = repr(error["input"])
    if len(shown) > 200:  # a rejected data URL can be megabytes
        shown = shown[:200] + "..."
    return BadRequest(f"Invalid value {shown} for '{param}': {error['msg']}.", param=param)


# --------------------------------------------------------------------------------------------
# Responses


class TranscriptionUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: int  # audio duration rounded up to whole seconds


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TranscriptionJSON(BaseModel):
    """``response_format=json`` (and the shape of ``translations`` json)."""

    text: str
    usage: TranscriptionUsage
    logprobs: list[TokenLogprob] | None = None


class TranscriptionSegmentModel(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionWordModel(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionVerbose(BaseModel):
    """``response_format=verbose_json``; serialise without None so absent lists are omitted."""

    task: Literal["transcribe", "translate"]
    language: str  # full lower-case English name, e.g. "german"
    duration: float
    text: str
    segments: list[TranscriptionSegmentModel] | None = None
    words: list[TranscriptionWordModel] | None = None
    usage: TranscriptionUsage


class TranscriptTextDelta(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str
    logprobs: list[TokenLogprob] | None = None


class TranscriptTextDone(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: TranscriptionUsage | None = None
    logprobs: list[TokenLogprob] | None = None


class DiarizedSegmentModel(BaseModel):
    """A segment of ``diarized_json``, and with ``stream=true`` a ``transcript.text.segment``
    event (the same fields)."""

    type: Literal["transcript.text.segment"] = "transcript.text.segment"
    id: str
    start: float
    end: float
    text: str
    speaker: str  # a known speaker's name, else "A", "B", ... by first appearance


class TranscriptionDiarized(BaseModel):
    """``response_format=diarized_json``."""

    task: Literal["transcribe"] = "transcribe"
    duration: float
    text: str
    segments: list[DiarizedSegmentModel]
    usage: TranscriptionUsage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
