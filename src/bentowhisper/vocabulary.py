"""Whisper's special tokens, read once from a checkpoint's tokenizer and generation config.

Both sides use it: the model service to build prompts and apply the decoding rules, the API
service to split windows into segments and to turn tokens into text, without loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import GenerationConfig, WhisperTokenizerFast

TIME_PRECISION = 0.02  # seconds per timestamp token (and per encoder frame)


@dataclass(frozen=True)
class Vocabulary:
    tokenizer: WhisperTokenizerFast = field(repr=False)
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
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, tokens: list[int]) -> str:
        """Text of the given tokens; timestamp and special tokens are dropped."""
        return self.tokenizer.decode([t for t in tokens if t < self.eot])


def _token_id(tokenizer: WhisperTokenizerFast, *names: str) -> int:
    vocab = tokenizer.get_vocab()
    for name in names:
        if name in vocab:
            return vocab[name]
    raise ValueError(f"tokenizer has none of {names}")


def load_vocabulary(
    checkpoint: str | Path, tokenizer: WhisperTokenizerFast | None = None
) -> Vocabulary:
    """Read a checkpoint's special tokens; ``tokenizer`` avoids loading it twice."""
    tokenizer = tokenizer or WhisperTokenizerFast.from_pretrained(checkpoint)
    generation = GenerationConfig.from_pretrained(checkpoint)
    no_timestamps = _token_id(tokenizer, "<|notimestamps|>")
    lang_to_id = getattr(generation, "lang_to_id", None) or {}
    multilingual = bool(getattr(generation, "is_multilingual", False) and lang_to_id)
    languages = (
        {token.strip("<|>"): int(i) for token, i in lang_to_id.items()} if multilingual else {}
    )
    tasks = dict(getattr(generation, "task_to_id", None) or {}) if multilingual else {}
    ids = {
        "sot": _token_id(tokenizer, "<|startoftranscript|>"),
        "eot": _token_id(tokenizer, "<|endoftext|>"),
        "sot_prev": _token_id(tokenizer, "<|startofprev|>"),
        "no_speech": _token_id(tokenizer, "<|nospeech|>", "<|nocaptions|>"),
    }
    # openai-whisper suppresses its non-speech symbols plus every special token that must never
    # be sampled inside a transcript.
    never = {ids["sot"], ids["sot_prev"], ids["no_speech"], *tasks.values()}
    if "<|startoflm|>" in tokenizer.get_vocab():
        never.add(_token_id(tokenizer, "<|startoflm|>"))
    suppress = sorted(set(generation.suppress_tokens or []) | never)
    heads = getattr(generation, "alignment_heads", None) or []
    return Vocabulary(
        tokenizer=tokenizer,
        no_timestamps=no_timestamps,
        timestamp_begin=no_timestamps + 1,
        is_multilingual=multilingual,
        language_tokens=languages,
        task_tokens={str(k): int(v) for k, v in tasks.items()},
        suppress_tokens=tuple(suppress),
        begin_suppress_tokens=tuple(generation.begin_suppress_tokens or []),
        alignment_heads=tuple((int(layer), int(head)) for layer, head in heads),
        **ids,
    )
