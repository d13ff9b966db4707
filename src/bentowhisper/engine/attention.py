"""The ``hybrid`` attention implementation: SDPA, except for one-token decoder steps.

PyTorch's CPU SDPA kernel (flash attention) is built for long queries. For a decoder step in
bf16, one query against the 1,500 encoder positions, it was 3.5x (one row) to 7x (8 rows)
slower here than two plain matmuls and a softmax, and a step of base runs it 12 times (self-
and cross-attention in each layer); in fp32 the two are about even (0.8x to 1.2x).
``benchmarks/attention_kernels.py`` measures it; docs/benchmarks.md has the figures. The
encoder and the prompt's prefill keep SDPA, which is as fast or faster there.

Importing this module registers the name with transformers, so that
``from_pretrained(attn_implementation="hybrid")`` and the masks it builds know it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "hybrid"


def hybrid_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (batch, heads, length, head_dim) in, the output as
    (batch, length, heads, head_dim) out."""
    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        # sdpa_mask's masks are boolean (True: attend); a float mask is added, as SDPA does
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    # the softmax in fp32, as in SDPA's kernels (fp32 keys and values would double the bytes read)
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype)
    output = torch.matmul(weights, value)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, hybrid_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
