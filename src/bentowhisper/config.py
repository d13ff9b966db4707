"""Configuration in one place: a YAML profile from ``configs/`` plus ``BENTOWHISPER_*`` overrides.

The profile is ``configs/cpu.yaml`` unless ``BENTOWHISPER_CONFIG`` names another file (for
example ``configs/gpu.yaml``). Every field below can then be overridden by an environment
variable named ``BENTOWHISPER_`` + the field name in upper case; lists are comma-separated.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

ENV_PREFIX = "BENTOWHISPER_"
# Variables with the prefix that are not settings: the profile file, the FFmpeg binary
# (server/audio.py) and the evaluation set of tests and benchmarks.
OTHER_VARIABLES = {ENV_PREFIX + "CONFIG", ENV_PREFIX + "FFMPEG", ENV_PREFIX + "EVAL_DIR"}
# configs/ sits beside src/ in the repository, and beside the package inside a Bento (whose
# build strips the src/ prefix).
REPO_ROOT = next(
    (p for p in Path(__file__).resolve().parents[1:3] if (p / "configs").is_dir()),
    Path(__file__).resolve().parents[2],
)
DEFAULT_PROFILE = REPO_ROOT / "configs" / "cpu.yaml"
CHUNKING = ("auto", "none")  # values of the `chunking` setting


@dataclass(frozen=True)
class Settings:
    # Model: an embedded name ("tiny.en", "base"), a local checkpoint directory or a hub id.
    model: str = "base"
    # A BentoML model-store tag (`bentowhisper models import NAME`, e.g. "whisper-base:latest").
    # When set, the weights come from the store and `bentoml build` packs them into the Bento;
    # `model` is then only the served name.
    bento_model: str = ""
    # Names clients may send as `model`; the first is what /v1/models reports first.
    model_aliases: list[str] = field(default_factory=lambda: ["whisper-1"])
    # Where converted embedded checkpoints are cached.
    models_dir: str = "~/.cache/bentowhisper/models"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # "auto": fp16 on GPUs; bf16 on CPUs with bf16 instructions, else fp32 (models.resolve_dtype)
    dtype: str = "auto"
    attn_implementation: str = "hybrid"  # SDPA plus matmuls for 1-token steps (attention.py)
    # "auto": the fastest that keeps accuracy for the CPU found (engine/speed.py); "none";
    # "int8" (all linear layers) or "int8:<parts>" (encoder, decoder, proj_out), CPU only
    quantization: str = "auto"
    # Adaptive batching of 30 s windows across requests.
    max_batch_size: int = 8
    max_latency_ms: int = 300_000
    # Windows of audio over 30 s are decoded this many tokens per call, so a long file never
    # holds a batch (and the short requests in it) for a whole window; 0 disables slicing.
    slice_tokens: int = 32
    api_workers: int = 1  # API service processes (HTTP, audio decoding, formatting)
    request_timeout_s: float = 600.0  # BentoML's traffic timeout for one request
    # Request limits.
    max_upload_mb: float = 25.0
    max_audio_seconds: float = 3 * 3600.0
    decode_timeout_s: float = 120.0
    # Requests in flight per API worker before 429 + Retry-After (the rest would only queue).
    max_concurrent_requests: int = 16
    # diarized_json: at most this many speakers per file (their count comes from the audio).
    max_speakers: int = 8
    # false: no speaker-encoder service (one process, or one replica, fewer); diarized_json
    # then answers 400.
    diarization: bool = True
    # Bearer keys; empty means no authentication.
    api_keys: list[str] = field(default_factory=list)
    api_key_file: str = ""
    # What a request without chunking_strategy gets: "auto" (VAD chunks decoded in parallel;
    # no audio without speech is decoded) or "none" (whisper-1's sequential loop).
    chunking: str = "auto"
    # Long files' chunks at the model service at once: per request, and for all requests of
    # an API worker together (server/chunked.py, Lanes).
    max_chunks_in_flight: int = 8

    # BentoML's access line for every internal decode call (one per window and slice).
    log_decode_requests: bool = False
    # Realtime transcription sessions (WebSocket /v1/realtime).
    realtime_max_sessions: int = 32  # per API worker; beyond it the handshake gets 429
    realtime_max_turn_s: float = 30.0  # server VAD cuts a turn here; manual buffers stop here
    realtime_idle_timeout_s: float = 60.0  # a session with no client event this long is closed
    realtime_max_message_kb: float = 1024.0  # larger messages get an error event, unapplied
    realtime_partial_interval_ms: int = 700  # a growing turn is re-decoded at most this often

    def __post_init__(self) -> None:
        if self.chunking not in CHUNKING:
            raise ValueError(f"chunking must be one of {CHUNKING}, not {self.chunking!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser()


def _coerce(value: str, annotation: str) -> object:
    hint = eval(annotation, {"list": list, "str": str, "int": int, "float": float})
    if isinstance(hint, types.GenericAlias) and typing.get_origin(hint) is list:
        return [item.strip() for item in value.split(",") if item.strip()]
    if hint is bool:
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return hint(value)


def load_settings(environ: typing.Mapping[str, str] | None = None) -> Settings:
    """Read the profile named by ``BENTOWHISPER_CONFIG`` (or the CPU default), then overrides."""
    environ = os.environ if environ is None else environ
    profile = Path(environ.get(ENV_PREFIX + "CONFIG", DEFAULT_PROFILE))
    if not profile.is_absolute() and not profile.exists():
        profile = REPO_ROOT / profile
    values: dict[str, object] = (
        yaml.safe_load(profile.read_text()) or {} if profile.exists() else {}
    )
    known = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown settings in {profile}: {sorted(unknown)}")
    expected = {ENV_PREFIX + name.upper() for name in known} | OTHER_VARIABLES
    mistyped = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in expected)
    if mistyped:
        # A typo would otherwise leave the default in force without a word.
        hints = [
            f"{k} (did you mean {close[0]}?)"
            if (close := difflib.get_close_matches(k, expected, 1))
            else k
            for k in mistyped
        ]
        raise ValueError(
            f"unknown environment variables: {', '.join(hints)}; see README's settings"
        )
    for name, spec in known.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(raw, str(spec.type))
    return Settings(**values)


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
