"""Batched decoding of 30 s windows: the only code that calls the Whisper model.

Every forward pass goes through :func:`decode_batch`, which takes a list of independent
:class:`DecodeJob` (one window's log-mel features plus its own prompt, language, task and
temperature) and returns one :class:`DecodeResult` each. Jobs from different requests share
the encoder pass and every decoder step, which is what adaptive batching across requests needs.

A job may carry a step budget (``max_steps``): it then comes back unfinished (``done=False``)
after that many tokens and is resubmitted with its tokens so far (``resume``). A long file's
windows are decoded in such slices so that no batch is held for a whole 30 s window while
short requests wait behind it; an :class:`EncoderCache` keeps the window's encoder output
between slices, so a resumed slice comes without its features. When the cache no longer holds
it (evicted, or the slice landed on another replica) the item comes back ``evicted`` and the
caller sends it again with the features.

The decoding rules follow openai-whisper's ``DecodingTask`` (greedy at temperature 0, sampling
above it, the blank/special-token suppression and the timestamp rules), vectorised over the
batch so that the per-token Python cost does not grow with the batch size.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import numpy as np
import torch

from ..vocabulary import Vocabulary
from ..wire import MAX_INITIAL_TIMESTAMP, MAX_PROMPT, SAMPLE_LEN, DecodeJob, DecodeResult
from .alignment import align_tokens
from .loading import WhisperBundle

log = logging.getLogger(__name__)


class EncoderCache:
    """Encoder outputs of windows decoded in slices, by job key; least recently used first out.

    Used from the one thread that runs the model, one batch at a time.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str | None) -> torch.Tensor | None:
        if key is None or key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: str, encoded: torch.Tensor) -> None:
        self._items[key] = encoded
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __contains__(self, key: str | None) -> bool:
        return key is not None and key in self._items

    def discard(self, key: str | None) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


def decode_batch(
    bundle: WhisperBundle, jobs: list[DecodeJob], cache: EncoderCache | None = None
) -> list[DecodeResult]:
    """Decode every job in shared forward passes; a failure is reported per item, never raised.

    If the batch as a whole fails (say, out of memory), each job is retried alone so that one
    bad item cannot fail its neighbours.
    """
    if not jobs:
        return []
    # a resumed slice without features whose encoder output is gone: the caller resends it
    evicted = {
        i
        for i, job in enumerate(jobs)
        if job.features is None and (cache is None or job.key not in cache)
    }
    if evicted:
        rest = [job for i, job in enumerate(jobs) if i not in evicted]
        decoded = iter(decode_batch(bundle, rest, cache))
        return [
            DecodeResult.evicted_for(job) if i in evicted else next(decoded)
            for i, job in enumerate(jobs)
        ]
    # encoder outputs of different lengths cannot share the decoder's cross-attention
    lengths: dict[int | None, list[int]] = {}
    for i, job in enumerate(jobs):
        lengths.setdefault(job.encode_frames, []).append(i)
    if len(lengths) > 1:
        results: dict[int, DecodeResult] = {}
        for indices in lengths.values():
            group = decode_batch(bundle, [jobs[i] for i in indices], cache)
            results.update(zip(indices, group, strict=True))
        return [results[i] for i in range(len(jobs))]
    try:
        with torch.inference_mode():
            return _decode(bundle, jobs, cache)
    except Exception as exc:
        if len(jobs) == 1:
            log.exception("decoding failed")
            if cache is not None:
                cache.discard(jobs[0].key)
            return [_failed(jobs[0], exc)]
        log.warning("batch of %d failed (%s); retrying items one by one", len(jobs), exc)
        return [result for job in jobs for result in decode_batch(bundle, [job], cache)]


def _failed(job: DecodeJob, exc: Exception) -> DecodeResult:
    return DecodeResult(
        tokens=[],
        avg_logprob=-math.inf,
        no_speech_prob=0.0,
        language=job.language or "",
        language_probability=0.0,
        temperature=job.temperature,
        error=f"{type(exc).__name__}: {exc}",
    )


def _decode(
    bundle: WhisperBundle, jobs: list[DecodeJob], cache: EncoderCache | None
) -> list[DecodeResult]:
    vocab = bundle.vocab
    encoded = _encode(bundle, jobs, cache)
    languages = _resolve_languages(bundle, encoded, jobs)
    prefixes = [
        _prefix(vocab, job, language) for job, (language, _) in zip(jobs, languages, strict=True)
    ]
    tokens, token_logprobs, sum_logprobs, no_speech, done = _sample(bundle, encoded, jobs, prefixes)

    results = []
    for i, job in enumerate(jobs):
        language, language_probability = languages[i]
        results.append(
            DecodeResult(
                tokens=tokens[i],
                # openai-whisper: the sum includes <|endoftext|>, hence the + 1
                avg_logprob=sum_logprobs[i] / (len(tokens[i]) + 1),
                sum_logprob=sum_logprobs[i],
                token_logprobs=token_logprobs[i],
                done=done[i],
                no_speech_prob=no_speech[i],
                language=language,
                language_probability=language_probability,
                temperature=job.temperature,
            )
        )
        if cache is not None and job.key is not None:
            if done[i]:
                cache.discard(job.key)
            else:
                cache.put(job.key, encoded[i].clone())  # a view would pin the whole batch
    wanted = [i for i, job in enumerate(jobs) if job.word_timestamps and done[i]]
    if wanted:
        alignments = align_tokens(
            bundle,
            encoded[wanted],
            # from <|startoftranscript|> on, as openai-whisper aligns: without the prompt
            [prefixes[i][prefixes[i].index(vocab.sot) :] for i in wanted],
            [[t for t in results[i].tokens if t < vocab.eot] for i in wanted],
            [jobs[i].num_frames for i in wanted],
        )
        for i, (times, probs) in zip(wanted, alignments, strict=True):
            results[i].token_times, results[i].token_probs = times, probs
    return results


def _encode(
    bundle: WhisperBundle, jobs: list[DecodeJob], cache: EncoderCache | None
) -> torch.Tensor:
    """The encoder output of every job's window: from the cache, else one batched pass."""
    cached = [cache.get(job.key) if cache is not None else None for job in jobs]
    missing = [i for i, hit in enumerate(cached) if hit is None]
    if missing:
        frames = jobs[missing[0]].encode_frames  # one length per batch (decode_batch)
        mels = np.stack([jobs[i].mel()[:, :frames] for i in missing])
        features = torch.from_numpy(mels).to(bundle.device, bundle.dtype)
        if frames is None:
            fresh = bundle.model.model.encoder(features).last_hidden_state
        else:
            fresh = encode_prefix(bundle, features)
        if len(missing) == len(jobs):
            return fresh
        for row, i in enumerate(missing):
            cached[i] = fresh[row]
    return torch.stack(cached)


def encode_prefix(bundle: WhisperBundle, features: torch.Tensor) -> torch.Tensor:
    """The encoder on the first frames of a window, shape (batch, n_mels, frames).

    transformers' encoder insists on 3000 frames; this is its forward pass (inference only:
    no dropout or layer drop) with the position embeddings cut to the input's length.
    """
    encoder = bundle.model.model.encoder
    hidden = torch.nn.functional.gelu(encoder.conv1(features))
    hidden = torch.nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
    for layer in encoder.layers:
        hidden = layer(hidden, None)
    return encoder.layer_norm(hidden)


def _resolve_languages(
    bundle: WhisperBundle, encoded: torch.Tensor, jobs: list[DecodeJob]
) -> list[tuple[str, float]]:
    """The language of each job: as given, or detected from the window (reusing its encoding)."""
    vocab = bundle.vocab
    resolved = [(job.language or "en", 1.0) for job in jobs]
    undetermined = [i for i, job in enumerate(jobs) if job.language is None]
    if not undetermined or not vocab.is_multilingual:
        return resolved
    sot = torch.full((len(undetermined), 1), vocab.sot, device=encoded.device)
    hidden = bundle.model.model.decoder(
        input_ids=sot, encoder_hidden_states=encoded[undetermined], use_cache=False
    ).last_hidden_state
    logits = bundle.model.proj_out(hidden[:, -1]).float()
    codes = list(vocab.language_tokens)
    ids = torch.tensor([vocab.language_tokens[code] for code in codes], device=logits.device)
    probs = logits[:, ids].softmax(dim=-1)
    best = probs.argmax(dim=-1)
    for row, i in enumerate(undetermined):
        resolved[i] = (codes[int(best[row])], float(probs[row, best[row]]))
    return resolved


def _prefix(vocab: Vocabulary, job: DecodeJob, language: str) -> list[int]:
    """[<|startofprev|> prompt...] <|startoftranscript|> [lang task] [<|notimestamps|>]"""
    prefix = [vocab.sot_prev, *job.prompt[-MAX_PROMPT:]] if job.prompt else []
    prefix.append(vocab.sot)
    if vocab.is_multilingual:
        prefix += [vocab.language_tokens[language], vocab.task_tokens[job.task]]
    if not job.timestamps:
        prefix.append(vocab.no_timestamps)
    return prefix


def _sample(
    bundle: WhisperBundle,
    encoded: torch.Tensor,
    jobs: list[DecodeJob],
    prefixes: list[list[int]],
) -> tuple[list[list[int]], list[list[float]], list[float], list[float], list[bool]]:
    """The decoding loop: left-padded prefixes, one step for all active rows at a time.

    Rows leave the batch (and the KV cache) as soon as they emit <|endoftext|> or use up their
    step budget, so a short window does not pay for a long neighbour. A resumed job's earlier
    tokens are fed with its prefix in the first pass, which rebuilds its KV cache.
    """
    model, vocab = bundle.model, bundle.vocab
    device = encoded.device
    batch = len(jobs)
    inputs = [p + job.resume for p, job in zip(prefixes, jobs, strict=True)]
    width = max(map(len, inputs))
    pad = vocab.eot
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in inputs], device=device)
    mask = torch.tensor(
        [[0] * (width - len(x)) + [1] * len(x) for x in inputs], device=device, dtype=torch.long
    )
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    sot_index = torch.tensor(
        [width - len(x) + p.index(vocab.sot) for p, x in zip(prefixes, inputs, strict=True)],
        device=device,
    )

    out = model.model.decoder(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        encoder_hidden_states=encoded,
        use_cache=True,
    )
    cache = out.past_key_values
    hidden = out.last_hidden_state
    rows = torch.arange(batch, device=device)
    # no-speech probability: the <|nospeech|> token right after <|startoftranscript|>
    sot_logits = model.proj_out(hidden[rows, sot_index]).float()
    no_speech = sot_logits.softmax(-1)[:, vocab.no_speech].tolist()
    logits = model.proj_out(hidden[:, -1]).float()

    rules = _Rules(vocab, jobs, device, logits.shape[-1])
    temperatures = torch.tensor([job.temperature for job in jobs], device=device)
    sampled = [list(job.resume) for job in jobs]
    token_logprobs = [list(job.resume_logprobs) for job in jobs]
    sum_logprobs = [job.resume_logprob for job in jobs]
    # Tokens a window may sample in all: SAMPLE_LEN, and no more than the decoder's context
    # holds after its prefix (openai-whisper stops once the sequence outgrows n_text_ctx; a
    # long prompt plus a long window would otherwise run past the position embeddings).
    n_ctx = model.config.max_target_positions
    window_limit = [min(SAMPLE_LEN, n_ctx + 1 - len(p)) for p in prefixes]
    # the last step each row may take in this call: its step budget, within its window's limit
    last_step = [
        min(limit - len(job.resume), job.max_steps or limit) - 1
        for limit, job in zip(window_limit, jobs, strict=True)
    ]
    done = [True] * batch
    active = rows.clone()  # original index of each row still decoding
    position = positions[:, -1]

    for step in range(max(last_step) + 1):
        logits = rules.apply(logits, active, step)
        logprobs = logits.log_softmax(dim=-1)
        chosen = logits.argmax(dim=-1)  # greedy rows; rows with a temperature sample instead
        temps = temperatures[active]
        hot = temps > 0
        if hot.any():
            scaled = logits[hot] / temps[hot, None]
            chosen[hot] = torch.multinomial(scaled.softmax(dim=-1), 1).squeeze(-1)
        chosen_logprobs = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
        chosen_list = chosen.tolist()
        unfinished = []
        for row, (index, token) in enumerate(zip(active.tolist(), chosen_list, strict=True)):
            sum_logprobs[index] += chosen_logprobs[row]
            if token == vocab.eot:
                continue
            sampled[index].append(token)
            token_logprobs[index].append(chosen_logprobs[row])
            if step < last_step[index]:
                unfinished.append(row)
            elif len(sampled[index]) < window_limit[index]:
                done[index] = False  # budget spent: the caller resumes it
        rules.record(active, chosen)
        if not unfinished:
            break
        if len(unfinished) < len(chosen_list):
            keep = torch.tensor(unfinished, device=device)
            cache.batch_select_indices(keep)
            active, chosen, position = active[keep], chosen[keep], position[keep]
            mask = mask[keep]
            encoded = encoded[keep]
        position = position + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model.model.decoder(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=position[:, None],
            encoder_hidden_states=encoded,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = model.proj_out(out.last_hidden_state[:, -1]).float()
    return sampled, token_logprobs, sum_logprobs, no_speech, done


class _Rules:
    """openai-whisper's logit filters (SuppressBlank, SuppressTokens, ApplyTimestampRules),
    applied to all rows at once with masks instead of a Python loop per row."""

    def __init__(self, vocab: Vocabulary, jobs: list[DecodeJob], device: torch.device, width: int):
        self.vocab = vocab
        ids = torch.arange(width, device=device)
        self.is_timestamp = ids >= vocab.timestamp_begin
        self.is_text = ids < vocab.eot
        self.suppress = torch.zeros(width, dtype=torch.bool, device=device)
        self.suppress[[t for t in vocab.suppress_tokens if t < width]] = True
        self.begin_suppress = torch.zeros(width, dtype=torch.bool, device=device)
        self.begin_suppress[[t for t in vocab.begin_suppress_tokens if t < width]] = True
        last_initial = vocab.timestamp_begin + round(MAX_INITIAL_TIMESTAMP / vocab.time_precision)
        self.too_late_initial = ids > last_initial
        self.ids = ids
        self.timestamps = torch.tensor([job.timestamps for job in jobs], device=device)
        # per original row: tokens sampled before this call, the last two sampled tokens
        # (-1: none) and the last timestamp seen; a resumed job starts from its earlier tokens
        history = [[-1, -1, *job.resume] for job in jobs]
        self.resumed = torch.tensor([len(job.resume) for job in jobs], device=device)
        self.last = torch.tensor([h[-1] for h in history], device=device)
        self.penultimate = torch.tensor([h[-2] for h in history], device=device)
        ts_begin = vocab.timestamp_begin
        # the timestamp token before which <|endoftext|> may not follow a timestamp
        self.cover_until = torch.tensor(
            [
                -1
                if job.cover_until is None
                else ts_begin + round(job.cover_until / vocab.time_precision)
                for job in jobs
            ],
            device=device,
        )
        self.last_timestamp = torch.tensor(
            [max((t for t in h if t >= ts_begin), default=-1) for h in history], device=device
        )

    def apply(self, logits: torch.Tensor, active: torch.Tensor, step: int) -> torch.Tensor:
        v = self.vocab
        sampled = self.resumed[active] + step  # tokens this row has sampled so far
        first = sampled == 0
        ban = self.suppress.expand_as(logits).clone()
        ban |= first[:, None] & self.begin_suppress
        ban[:, v.no_timestamps] = True
        with_ts = self.timestamps[active]
        ban |= ~with_ts[:, None] & self.is_timestamp

        last, penult = self.last[active], self.penultimate[active]
        last_ts = last >= v.timestamp_begin
        penult_ts = (penult >= v.timestamp_begin) | (sampled < 2)
        # timestamps come in pairs: after a pair only text, after a lone one no text
        ban |= (with_ts & last_ts & penult_ts)[:, None] & self.is_timestamp
        ban |= (with_ts & last_ts & ~penult_ts)[:, None] & self.is_text
        # a window that must cover its speech does not end on a segment opened too early
        ban[:, v.eot] |= with_ts & last_ts & penult_ts & (last < self.cover_until[active])
        # timestamps never go backwards (and a lone one may repeat, to close its segment)
        seen = self.last_timestamp[active]
        floor = torch.where(last_ts & ~penult_ts, seen, seen + 1)
        floor = torch.where(seen >= 0, floor, torch.zeros_like(floor))
        ban |= (with_ts[:, None] & self.is_timestamp) & (self.ids[None, :] < floor[:, None])
        ban |= (first & with_ts)[:, None] & (~self.is_timestamp | self.too_late_initial)[None, :]
        logits = logits.masked_fill(ban, -math.inf)

        # if the timestamps together are likelier than any text token, force a timestamp
        logprobs = logits.log_softmax(dim=-1)
        ts_mass = logprobs.masked_fill(~self.is_timestamp, -math.inf).logsumexp(dim=-1)
        best_text = logprobs.masked_fill(self.is_timestamp, -math.inf).max(dim=-1).values
        force = with_ts & (ts_mass > best_text)
        return logits.masked_fill(force[:, None] & ~self.is_timestamp, -math.inf)

    def record(self, active: torch.Tensor, chosen: torch.Tensor) -> None:
        self.penultimate[active] = self.last[active]
        self.last[active] = chosen
        is_ts = chosen >= self.vocab.timestamp_begin
        self.last_timestamp[active] = torch.where(is_ts, chosen, self.last_timestamp[active])
