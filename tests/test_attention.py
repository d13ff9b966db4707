"""The ``hybrid`` attention: SDPA's results with plain matmuls for one-token decoder steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import EVAL_DIR

from bentowhisper.engine.attention import NAME, hybrid_attention_forward
from bentowhisper.engine.decoding import decode_batch
from bentowhisper.engine.loading import load_whisper
from bentowhisper.server.audio import decode_audio
from bentowhisper.server.features import LogMel
from bentowhisper.wire import DecodeJob


class _Module(torch.nn.Module):
    is_causal = False


def _sdpa(query, key, value, mask):
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("query_length", [1, 7])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_sdpa_in_fp32(query_length: int, masked: bool) -> None:
    torch.manual_seed(0)
    query = torch.randn(3, 8, query_length, 64)
    key, value = torch.randn(3, 8, 40, 64), torch.randn(3, 8, 40, 64)
    mask = None
    if masked:  # left padding, as decode_batch's prompts of different lengths
        mask = torch.ones(3, 1, query_length, 40, dtype=torch.bool)
        mask[0, ..., :5] = False
        mask[2, ..., :17] = False
    out, weights = hybrid_attention_forward(_Module().eval(), query, key, value, mask)
    assert weights is None
    assert out.shape == (3, query_length, 8, 64)
    torch.testing.assert_close(out, _sdpa(query, key, value, mask), atol=1e-5, rtol=1e-5)


def test_bf16_one_token_step_is_close_to_fp32_sdpa() -> None:
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 8, n, 64) for n in (1, 1500, 1500))
    reference = _sdpa(query, key, value, None)
    out, _ = hybrid_attention_forward(
        _Module().eval(), query.bfloat16(), key.bfloat16(), value.bfloat16(), None
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)


def test_decodes_the_same_tokens_as_sdpa_in_fp32(converted_models_dir) -> None:
    """tiny.en on jfk with prompt padding in a batch: the tokens and log-probabilities of SDPA."""
    audio = decode_audio((EVAL_DIR / "audio/en_misc/jfk.flac").read_bytes())
    results = {}
    for implementation in ("sdpa", NAME):
        bundle = load_whisper(
            str(converted_models_dir / "tiny.en"),
            device="cpu",
            dtype="float32",
            attn_implementation=implementation,
        )
        assert bundle.model.config._attn_implementation == implementation
        mel = LogMel.from_checkpoint(bundle.checkpoint)(audio)
        prompt = bundle.vocab.encode(" President Kennedy's inaugural address, 1961.")
        jobs = [DecodeJob.for_window(mel), DecodeJob.for_window(mel, prompt=prompt)]
        results[implementation] = decode_batch(bundle, jobs)
    for ours, sdpa in zip(results[NAME], results["sdpa"], strict=True):
        assert ours.error is None and len(ours.tokens) > 20
        assert ours.tokens == sdpa.tokens
        assert np.isclose(ours.avg_logprob, sdpa.avg_logprob, atol=1e-4)
