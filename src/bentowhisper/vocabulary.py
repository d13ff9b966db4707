"""Whisper's special tokens, read once from a checkpoint's tokenizer and generation config.

Both sides use it: the model service to build prompts and apply the decoding rules, the API
service to split windows into segments and to turn tokens into text, without loading weights.
It reads ``tokenizer.json`` with ``tokenizers`` and ``generation_config.json`` as JSON:
importing transformers for them cost every API-side process 2.8 s at start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

TIME_PRECISION = 0.02  # seconds per timestamp token (and per encoder frame)


@dataclass(frozen=True)
class Vocabulary:
    tokenizer: Tokenizer = field(repr=False)
    sot: int
    eot: int
    sot_prev: int
    no_timestamps: int
    no_speech: int
    timestamp_begin: int
    is_multilingual: bool
    language_tokens: dict[str, int]  # ISO code -> <|xx|> id (empty for English-only models)
    task_tokens: dict[str, int]  # "transcribe"/"translate" -> id (empty for English-only)
    suppress_tokens: tuple[int, ...]
    begin_suppress_tokens: tuple[int, ...]
    alignment_heads: tuple[tuple[int, int], ...]  # (decoder layer, head)
    time_precision: float = TIME_PRECISION

    @property
    def languages(self) -> list[str]:
        return list(self.language_tokens) or ["en"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: list[int]) -> str:
        """Text of the given tokens; timestamp and special tokens are dropped."""
        return self.tokenizer.decode([t for t in tokens if t < self.eot], skip_special_tokens=False)


def _token_id(tokenizer: Tokenizer, *names: str) -> int:
    for name in names:
        token = tokenizer.token_to_id(name)
        if token is not None:
            return token
    raise ValueError(f"tokenizer has none of {names}")


def _read_checkpoint(checkpoint: str | Path) -> tuple[Tokenizer, dict[str, Any]]:
    directory = Path(checkpoint)
    tokenizer_json = directory / "tokenizer.json"
    generation_json = directory / "generation_config.json"
    if tokenizer_json.is_file() and generation_json.is_file():
        return Tokenizer.from_file(str(tokenizer_json)), json.loads(generation_json.read_text())
    # A hub id, or a checkpoint saved without tokenizer.json: transformers reads (or fetches)
    # and converts it. Only the model service gets here, which imports transformers anyway.
    from transformers import GenerationConfig, WhisperTokenizerFast

    fast = WhisperTokenizerFast.from_pretrained(str(checkpoint))
    return fast.backend_tokenizer, GenerationConfig.from_pretrained(str(checkpoint)).to_dict()


def load_vocabulary(checkpoint: str | Path) -> Vocabulary:
    """Read a checkpoint's special tokens."""
    tokenizer, generation = _read_checkpoint(checkpoint)
    no_timestamps = _token_id(tokenizer, "<|notimestamps|>")
    lang_to_id = generation.get("lang_to_id") or {}
    multilingual = bool(generation.get("is_multilingual") and lang_to_id)
    languages = (
        {token.strip("<|>"): int(i) for token, i in lang_to_id.items()} if multilingual else {}
    )
    tasks = dict(generation.get("task_to_id") or {}) if multilingual else {}
    ids = {
        "sot": _token_id(tokenizer, "<|startoftranscript|>"),
        "eot": _token_id(tokenizer, "<|endoftext|>"),
        "sot_prev": _token_id(tokenizer, "<|startofprev|>"),
        "no_speech": _token_id(tokenizer, "<|nospeech|>", "<|nocaptions|>"),
    }
    # openai-whisper suppresses its non-speech symbols plus every special token that must never
    # be sampled inside a transcript.
    never = {ids["sot"], ids["sot_prev"], ids["no_speech"], *tasks.values()}
    if tokenizer.token_to_id("<|startoflm|>") is not None:
        never.add(_token_id(tokenizer, "<|startoflm|>"))
    suppress = sorted(set(generation.get("suppress_tokens") or []) | never)
    heads = generation.get("alignment_heads") or []
    return Vocabulary(
        tokenizer=tokenizer,
        no_timestamps=no_timestamps,
        timestamp_begin=no_timestamps + 1,
        is_multilingual=multilingual,
        language_tokens=languages,
        task_tokens={str(k): int(v) for k, v in tasks.items()},
        suppress_tokens=tuple(suppress),
        begin_suppress_tokens=tuple(generation.get("begin_suppress_tokens") or []),
        alignment_heads=tuple((int(layer), int(head)) for layer, head in heads),
        **ids,
    )
