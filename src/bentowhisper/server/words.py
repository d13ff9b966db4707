"""Words from aligned tokens: splitting by language and merging punctuation (no torch)."""

from __future__ import annotations

import string

import numpy as np

from ..transcript import Word
from ..vocabulary import Vocabulary

PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
UNSPACED_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}


def group_words(
    vocab: Vocabulary,
    text_tokens: list[int],
    token_times: list[float],
    token_probs: list[float],
    language: str,
    offset: float,
) -> tuple[list[Word], list[int]]:
    """Words with their times (``offset`` added) and each word's token count, punctuation
    merged into the neighbouring word as openai-whisper does."""
    pieces = _split_words(vocab, text_tokens, language)
    words: list[tuple[str, list[int]]] = []
    cursor = 0
    for text, count in pieces:
        words.append((text, list(range(cursor, cursor + count))))
        cursor += count
    words = _merge_punctuation(words)
    result, counts = [], []
    for text, indices in words:
        if not indices:
            continue
        start = token_times[indices[0]]
        end = token_times[indices[-1] + 1]
        probability = float(np.mean([token_probs[k] for k in indices]))
        result.append(Word(text, round(offset + start, 3), round(offset + end, 3), probability))
        counts.append(len(indices))
    return result, counts


def _split_words(vocab: Vocabulary, tokens: list[int], language: str) -> list[tuple[str, int]]:
    """(text, token count) for each word; a word starts at a space or punctuation, or at every
    complete character for languages written without spaces."""
    pieces: list[tuple[str, int]] = []
    current: list[int] = []
    for token in tokens:
        current.append(token)
        text = vocab.decode(current)
        if "\ufffd" in text:  # an incomplete multi-byte character: keep accumulating
            continue
        starts_word = text.startswith(" ") or text.strip() in string.punctuation
        if language in UNSPACED_LANGUAGES or not pieces or starts_word:
            pieces.append((text, len(current)))
        else:
            prev_text, prev_count = pieces[-1]
            pieces[-1] = (prev_text + text, prev_count + len(current))
        current = []
    if current:
        pieces.append((vocab.decode(current), len(current)))
    return pieces


def _merge_punctuation(words: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    merged = [(text, list(indices)) for text, indices in words]
    # opening punctuation joins the following word
    for k in range(len(merged) - 2, -1, -1):
        text, indices = merged[k]
        if text.startswith(" ") and text.strip() in PREPEND_PUNCTUATION and text.strip():
            nxt_text, nxt_indices = merged[k + 1]
            merged[k + 1] = (text + nxt_text, indices + nxt_indices)
            merged[k] = ("", [])
    # closing punctuation joins the preceding word
    for k in range(1, len(merged)):
        text, indices = merged[k]
        if text and not text.endswith(" ") and text in APPEND_PUNCTUATION:
            target = k - 1
            while target >= 0 and not merged[target][1]:
                target -= 1
            if target >= 0:
                prev_text, prev_indices = merged[target]
                merged[target] = (prev_text + text, prev_indices + indices)
                merged[k] = ("", [])
    return [(text, indices) for text, indices in merged if indices]
