"""PyTorch's SDPA against the ``hybrid`` attention on Whisper's shapes, on this CPU.

Three shapes of base (8 heads of 64): a decoder step's cross-attention (one query against the
1,500 encoder positions) for 1 and 8 rows, and the encoder's self-attention (1,500 x 1,500) for
one window. For each, in fp32 and bf16: milliseconds per call (median of ``--repeats`` after a
warm-up) of ``F.scaled_dot_product_attention`` and of ``hybrid_attention_forward`` (which hands
queries longer than one token to SDPA itself), and the largest difference between the two.

    .venv/bin/python benchmarks/attention_kernels.py --out docs/results/attention-kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bentowhisper.engine.attention import hybrid_attention_forward

SHAPES = {  # name: (rows, query length)
    "decoder step, 1 row": (1, 1),
    "decoder step, 8 rows": (8, 1),
    "encoder, 1 window": (1, 1500),
}


class _Module(torch.nn.Module):
    is_causal = False


def milliseconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    module = _Module().eval()
    rows = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for name, (batch, length) in SHAPES.items():
                torch.manual_seed(0)
                query = torch.randn(batch, 8, length, 64, dtype=dtype)
                key, value = (torch.randn(batch, 8, 1500, 64, dtype=dtype) for _ in range(2))
                repeats = args.repeats if length == 1 else max(3, args.repeats // 10)
                sdpa = milliseconds(
                    lambda q=query, k=key, v=value: F.scaled_dot_product_attention(q, k, v),
                    repeats,
                )
                hybrid = milliseconds(
                    lambda q=query, k=key, v=value: hybrid_attention_forward(module, q, k, v, None),
                    repeats,
                )
                expected = F.scaled_dot_product_attention(query, key, value).transpose(1, 2)
                got, _ = hybrid_attention_forward(module, query, key, value, None)
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "shape": name,
                    "sdpa_ms": round(sdpa, 3),
                    "hybrid_ms": round(hybrid, 3),
                    "speed_up": round(sdpa / hybrid, 2),
                    "max_abs_diff": float((got.float() - expected.float()).abs().max()),
                }
                rows.append(row)
                print(
                    f"{row['dtype']:>8} {name:<22} SDPA {sdpa:8.3f} ms  hybrid {hybrid:8.3f} ms"
                    f"  {row['speed_up']:5.2f}x  max diff {row['max_abs_diff']:.1e}"
                )
    if args.out:
        report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
