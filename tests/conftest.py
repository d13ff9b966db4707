"""Shared test fixtures: the eval set location and the converted embedded models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The shared eval set sits beside the repository (``<clone>/../shared/eval``), wherever the
# repository is cloned; BENTOWHISPER_EVAL_DIR points elsewhere when set.
EVAL_DIR = Path(
    os.environ.get("BENTOWHISPER_EVAL_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "eval"
)


@pytest.fixture(scope="session")
def converted_models_dir() -> Path:
    """A models directory holding the converted embedded models (``tiny.en``, ``base``).

    ``BENTOWHISPER_MODELS_DIR`` if set, else the repository's git-ignored ``models/``, so the
    conversions (a few seconds each) are cached across test runs.
    """
    from bentowhisper.models import EMBEDDED, ensure_converted

    models_dir = Path(os.environ.get("BENTOWHISPER_MODELS_DIR") or REPO_ROOT / "models")
    for model in EMBEDDED.values():
        ensure_converted(model, models_dir)
    return models_dir
