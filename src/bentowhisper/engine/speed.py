"""What ``dtype: auto`` and ``quantization: auto`` resolve to on the machine found.

The fastest setting that keeps accuracy differs by CPU (figures in docs/benchmarks.md):

- bf16 instructions (AVX512-BF16 or AMX): bf16 through oneDNN, 1.6x faster than fp32.
- AVX2 without them: emulated bf16 is slower than fp32, and PyTorch's fp32 matrix products
  (MKL) are slow on AMD CPUs for the decoder's few-row products: the 51,865-logit output
  projection of one token took 30-40 ms. FBGEMM's dynamic int8 with per-channel weights does
  it in under 9 ms; the encoder's large products gain less and lose more accuracy.
  So fp32 with int8 for the parts listed in ``AVX2_QUANTIZATION``.
- GPUs: fp16.

:func:`choose_speed` is pure logic (the CPU's features are an argument) so that tests can
check every branch on any machine; ``loading.cpu_features`` reads them from torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Parts of the model that ``int8:<parts>`` can quantize (comma-separated).
QUANTIZABLE_PARTS = ("encoder", "decoder", "proj_out")
# The default on CPUs without bf16: see the module docstring and docs/benchmarks.md.
AVX2_QUANTIZATION = "int8:decoder,proj_out"


@dataclass(frozen=True)
class CpuFeatures:
    """What torch reports about this CPU."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT"...
    bf16: bool  # AVX512-BF16 or AMX: bf16 matrix products in hardware

    def describe(self) -> str:
        return f"{self.capability}, {'with' if self.bf16 else 'no'} AVX512-BF16/AMX"


@dataclass(frozen=True)
class SpeedChoice:
    """The precision a model is loaded in, and why (for the model service's logs)."""

    dtype: str  # "float32", "bfloat16", "float16"
    quantization: str  # "none" or "int8:<parts>"
    reason: str

    def describe(self) -> str:
        """One line for a startup or ready log: ``dtype float32, quantization int8:... (why)``."""
        return f"dtype {self.dtype}, quantization {self.quantization} ({self.reason})"


def quantized_parts(quantization: str) -> tuple[str, ...]:
    """``"none"`` -> (); ``"int8"`` -> every part; ``"int8:decoder,proj_out"`` -> those parts."""
    if quantization == "none":
        return ()
    scheme, _, parts = quantization.partition(":")
    if scheme != "int8":
        raise ValueError(
            f"unknown quantization {quantization!r}; use auto, none, int8 or "
            f"int8:<parts> with parts among {', '.join(QUANTIZABLE_PARTS)}"
        )
    if not parts:
        return QUANTIZABLE_PARTS
    chosen = tuple(part.strip() for part in parts.split(","))
    unknown = [part for part in chosen if part not in QUANTIZABLE_PARTS]
    if unknown or not chosen:
        raise ValueError(
            f"quantization {quantization!r}: unknown part(s) {', '.join(unknown) or '(empty)'}; "
            f"use {', '.join(QUANTIZABLE_PARTS)}"
        )
    return tuple(part for part in QUANTIZABLE_PARTS if part in chosen)  # canonical order


def choose_speed(
    device_type: str, dtype: str, quantization: str, features: CpuFeatures | None
) -> SpeedChoice:
    """Resolve ``auto`` in the requested dtype and quantization for a device ("cpu", "cuda").

    An explicit setting is kept: ``quantization: auto`` with an explicit dtype means no
    quantization (the user chose the precision), and int8 needs float32 around it.
    ``features`` describes the CPU (only read when ``device_type`` is "cpu").
    """
    if dtype != "auto" and quantization == "auto":
        quantization = "none"
    if quantization not in ("auto", "none"):
        parts = quantized_parts(quantization)
        canonical = "int8:" + ",".join(parts)
        if device_type != "cpu":
            raise ValueError("int8 dynamic quantization runs on the CPU only; use float16 on GPUs")
        if dtype not in ("auto", "float32", "fp32", "float"):
            raise ValueError(f"int8 dynamic quantization needs dtype float32 or auto, not {dtype}")
        return SpeedChoice("float32", canonical, "quantization as configured")
    if dtype != "auto":
        return SpeedChoice(dtype, "none", "dtype as configured")
    if device_type != "cpu":
        return SpeedChoice("float16", "none", f"auto on {device_type}: fp16")
    assert features is not None, "the CPU's features are needed to resolve auto on the CPU"
    if features.bf16:
        return SpeedChoice(
            "bfloat16", "none", f"auto: CPU {features.describe()}: bf16, 1.6x faster than fp32"
        )
    if quantization == "none":
        return SpeedChoice(
            "float32", "none", f"auto: CPU {features.describe()}: emulated bf16 is slower"
        )
    return SpeedChoice(
        "float32",
        AVX2_QUANTIZATION,
        f"auto: CPU {features.describe()}: fp32, and dynamic int8 where it keeps the WER",
    )
