"""Loading a checkpoint into a :class:`WhisperBundle` on a device and dtype (torch lives here)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    from ..config import Settings
    from ..vocabulary import Vocabulary

from .checkpoints import resolve_checkpoint

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: the first CUDA GPU if there is one, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"``: float16 on GPUs; on CPUs bfloat16 where the CPU has bf16 instructions
    (AVX512-BF16 or AMX), else float32, since emulated bf16 is slower than fp32."""
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(set(_DTYPES)))}")
    return getattr(torch, _DTYPES[dtype])


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (on an AMD EPYC with AVX512-BF16 a window
    decoded 1.6x faster in bf16 than in fp32; speed and accuracy in docs/benchmarks.md)."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass
class WhisperBundle:
    """A loaded Whisper checkpoint: everything decoding needs."""

    model: WhisperForConditionalGeneration  # in eval mode, on ``device`` in ``dtype``
    tokenizer: WhisperTokenizerFast
    feature_extractor: WhisperFeatureExtractor
    device: torch.device
    dtype: torch.dtype
    name: str  # what the user asked for ("base", a directory, a hub id)
    checkpoint: str = ""  # what was loaded (a directory or a hub id)

    @cached_property
    def vocab(self) -> Vocabulary:
        """The special token ids and decoding lists (see :mod:`.vocabulary`)."""
        from ..vocabulary import load_vocabulary

        return load_vocabulary(self.checkpoint or self.name, tokenizer=self.tokenizer)


def load_whisper(
    checkpoint: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    quantization: str = "none",
    name: str | None = None,
) -> WhisperBundle:
    """Load model, tokenizer and feature extractor of a checkpoint (a directory or a hub id).

    The model is in eval mode with gradients off for its parameters; wrap calls in
    ``torch.inference_mode()``.
    """
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    from . import attention  # noqa: F401 - registers the "hybrid" attention implementation

    torch_device = resolve_device(device)
    if quantization == "int8" and dtype == "auto":
        dtype = "float32"  # dynamic int8 quantization takes fp32 linear layers
    torch_dtype = resolve_dtype(dtype, torch_device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = WhisperForConditionalGeneration.from_pretrained(checkpoint, **kwargs)
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    if quantization == "int8":
        model = _quantize_int8(model, torch_device)
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}; use none or int8")
    return WhisperBundle(
        model=model,
        tokenizer=WhisperTokenizerFast.from_pretrained(checkpoint),
        feature_extractor=WhisperFeatureExtractor.from_pretrained(checkpoint),
        device=torch_device,
        dtype=torch_dtype,
        name=name or checkpoint,
        checkpoint=checkpoint,
    )


def _quantize_int8(
    model: WhisperForConditionalGeneration, device: torch.device
) -> WhisperForConditionalGeneration:
    """Dynamic int8 quantization of the linear layers: int8 weights, activations quantized on
    the fly. On CPUs it cuts most of the matmul time (see docs/benchmarks.md for speed and WER);
    GPUs have faster options (fp16/bf16), so it is refused there."""
    import torch

    if device.type != "cpu":
        raise ValueError("int8 dynamic quantization runs on the CPU only; use float16 on GPUs")
    if model.dtype != torch.float32:
        raise ValueError("int8 dynamic quantization needs dtype float32 (or auto)")
    with warnings.catch_warnings():  # torch.ao's notice that torchao is its successor
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_from_settings(settings: Settings, checkpoint: str | None = None) -> WhisperBundle:
    """Load ``checkpoint`` (default: ``settings.model`` resolved, converting an embedded model
    on first use) on the settings' device, dtype and attention implementation."""
    return load_whisper(
        checkpoint or resolve_checkpoint(settings.model, settings.models_path),
        device=settings.device,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
        quantization=settings.quantization,
        name=settings.model,
    )
