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
    )

    from ..config import Settings
    from ..vocabulary import Vocabulary

from .checkpoints import resolve_checkpoint
from .speed import CpuFeatures, SpeedChoice, choose_speed, quantized_parts

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


def cpu_features() -> CpuFeatures:
    """What ``auto`` reads. torch's kernels capped below AVX-512 (``ATEN_CPU_CAPABILITY=avx2``,
    how the AVX2 default is tried on a bf16 machine: docs/benchmarks.md) count as no bf16."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return CpuFeatures(
        capability=capability, bf16=capability.startswith("AVX512") and cpu_has_bf16()
    )


@dataclass
class WhisperBundle:
    """A loaded Whisper checkpoint: everything decoding needs."""

    model: WhisperForConditionalGeneration  # in eval mode, on ``device`` in ``dtype``
    feature_extractor: WhisperFeatureExtractor
    device: torch.device
    dtype: torch.dtype
    name: str  # what the user asked for ("base", a directory, a hub id)
    checkpoint: str = ""  # what was loaded (a directory or a hub id)
    speed: SpeedChoice | None = None  # the dtype and quantization chosen, and why

    @cached_property
    def vocab(self) -> Vocabulary:
        """The special token ids and decoding lists (see :mod:`.vocabulary`)."""
        from ..vocabulary import load_vocabulary

        return load_vocabulary(self.checkpoint or self.name)


def load_whisper(
    checkpoint: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    quantization: str = "none",
    name: str | None = None,
) -> WhisperBundle:
    """Load model and feature extractor of a checkpoint (a directory or a hub id).

    The model is in eval mode with gradients off for its parameters; wrap calls in
    ``torch.inference_mode()``.
    """
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    from . import attention  # noqa: F401 - registers the "hybrid" attention implementation

    torch_device = resolve_device(device)
    features = cpu_features() if torch_device.type == "cpu" else None
    speed = choose_speed(torch_device.type, dtype, quantization, features)
    log.info("precision: %s", speed.describe())
    torch_dtype = resolve_dtype(speed.dtype, torch_device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = WhisperForConditionalGeneration.from_pretrained(checkpoint, **kwargs)
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    parts = quantized_parts(speed.quantization)
    if parts:
        _quantize_int8(model, parts)
    return WhisperBundle(
        model=model,
        feature_extractor=WhisperFeatureExtractor.from_pretrained(checkpoint),
        device=torch_device,
        dtype=torch_dtype,
        name=name or checkpoint,
        checkpoint=checkpoint,
        speed=speed,
    )


def _quantize_int8(model: WhisperForConditionalGeneration, parts: tuple[str, ...]) -> None:
    """Dynamic int8 quantization, in place, of the linear layers of ``parts`` (see
    ``speed.QUANTIZABLE_PARTS``): int8 weights with one scale per output channel, activations
    quantized per tensor on the fly, FBGEMM's kernels. One scale per channel, as the
    CTranslate2 int8 weights we convert from have; torch's default (one per tensor) cost
    accuracy. ``choose_speed`` has already checked device (CPU) and dtype (float32)."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    prefixes = {"encoder": "model.encoder.", "decoder": "model.decoder.", "proj_out": "proj_out"}
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(name.startswith(prefixes[part]) for part in parts)
    }
    with warnings.catch_warnings():  # torch.ao's notices that torchao is its successor
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


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
