"""Word timestamps from the cross-attention of Whisper's alignment heads (DTW), as
openai-whisper's ``timing.py`` computes them.

:func:`align_tokens` runs on the model side, inside a decoding batch: one extra decoder pass
over the window's text tokens, whose alignment-head attention to the audio frames is
time-warped onto the token sequence. :func:`group_words` runs on the API side and turns token
times into words with punctuation attached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .loading import WhisperBundle

FRAMES_PER_TOKEN_TIME = 50  # encoder frames per second
MEDIAN_FILTER_WIDTH = 7


def align_tokens(
    bundle: WhisperBundle,
    encoded: torch.Tensor,
    sot_sequences: list[list[int]],
    text_tokens: list[list[int]],
    num_frames: list[int],
) -> list[tuple[list[float], list[float]]]:
    """For each window: the start time of every text token plus a final end time (seconds from
    the window start), and every text token's probability."""
    vocab = bundle.vocab
    decoder = bundle.model.model.decoder
    sequences = [
        [*sot, vocab.no_timestamps, *text, vocab.eot]
        for sot, text in zip(sot_sequences, text_tokens, strict=True)
    ]
    width = max(map(len, sequences))
    # right padding: with causal attention the padded tail cannot change the real rows
    input_ids = torch.tensor(
        [seq + [vocab.eot] * (width - len(seq)) for seq in sequences], device=encoded.device
    )
    layers = sorted({layer for layer, _ in vocab.alignment_heads})
    queries: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module, args, kwargs):
            attn = decoder.layers[layer].encoder_attn
            hidden = args[0] if args else kwargs["hidden_states"]
            queries[layer] = attn.q_proj(hidden) * attn.scaling

        return hook

    handles = [
        decoder.layers[layer].encoder_attn.register_forward_pre_hook(
            capture(layer), with_kwargs=True
        )
        for layer in layers
    ]
    try:
        hidden = decoder(
            input_ids=input_ids, encoder_hidden_states=encoded, use_cache=False
        ).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    logits = bundle.model.proj_out(hidden).float()

    results = []
    for i, (sot, text) in enumerate(zip(sot_sequences, text_tokens, strict=True)):
        if not text:
            results.append(([], []))
            continue
        first = len(sot)  # the <|notimestamps|> row predicts the first text token
        probs = logits[i, first : first + len(text), : vocab.eot].softmax(dim=-1)
        token_probs = probs[torch.arange(len(text)), torch.tensor(text)].tolist()
        qk = torch.stack(
            [
                _head_logits(decoder, layer, head, queries[layer][i], encoded[i])
                for layer, head in vocab.alignment_heads
            ]
        )
        weights = qk[:, first : first + len(text) + 1, : num_frames[i] // 2].float().softmax(dim=-1)
        std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
        weights = _median_filter((weights - mean) / std, MEDIAN_FILTER_WIDTH)
        matrix = weights.mean(dim=0).cpu().numpy()
        text_index, time_index = dtw(-matrix.astype(np.float64))
        jumps = np.pad(np.diff(text_index), (1, 0), constant_values=1).astype(bool)
        times = (time_index[jumps] / FRAMES_PER_TOKEN_TIME).tolist()
        results.append((times, token_probs))
    return results


def _head_logits(
    decoder: torch.nn.Module, layer: int, head: int, query: torch.Tensor, encoded: torch.Tensor
) -> torch.Tensor:
    """Pre-softmax cross-attention logits of one head: (tokens, frames)."""
    attn = decoder.layers[layer].encoder_attn
    size = attn.head_dim
    q = query[:, head * size : (head + 1) * size]
    k = attn.k_proj(encoded)[:, head * size : (head + 1) * size]
    return q @ k.T


def _median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = F.pad(x[None], (pad, pad, 0, 0), mode="reflect")[0]
    return padded.unfold(-1, width, 1).median(dim=-1).values


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic time warping of a (tokens, frames) cost matrix: the monotonic path of least cost.

    Cells on one anti-diagonal depend only on the two before it, so each diagonal is computed
    in one vectorised step (tokens + frames steps instead of tokens x frames).
    """
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0, c1, c2 = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        choice = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        total[i, j] = cost[i - 1, j - 1] + np.choose(choice, [c0, c1, c2])
        trace[i, j] = choice
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    path_array = np.array(path[::-1])
    return path_array[:, 0], path_array[:, 1]
