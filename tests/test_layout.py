"""The package is laid out as the two services it runs: the API side never imports torch.

``bentowhisper.server`` (routes, serving core, audio, features, formats, the long-form loop),
``bentowhisper.wire`` and what ``service.py`` needs for the API service are imported in a fresh
interpreter whose import system refuses ``torch``; its numpy log-mel is checked against
transformers' ``WhisperFeatureExtractor``, which it replaces there.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from support import EVAL_DIR, REPO_ROOT

SERVER = REPO_ROOT / "src/bentowhisper/server"

# Run in a child interpreter: a meta-path finder whose torch fails to load, then the API side,
# as BentoML's API worker imports it (service.py) and as its __init__ builds it. The finder
# still answers find_spec, as an installed torch does: transformers probes for it (without
# importing it) wherever it is installed.
NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, json, pkgutil, sys

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"the API side imported {spec.name}")

        def exec_module(self, module):
            pass

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, NoTorch())
    import bentowhisper.server, bentowhisper.wire
    for module in pkgutil.iter_modules(bentowhisper.server.__path__):
        __import__(f"bentowhisper.server.{module.name}")
    import service
    from bentowhisper.engine.checkpoints import await_converted
    from bentowhisper.server.features import LogMel
    from bentowhisper.vocabulary import load_vocabulary

    path = await_converted("tiny.en", sys.argv[1], timeout_s=5)
    vocab, features = load_vocabulary(path), LogMel.from_checkpoint(path)
    print(json.dumps({
        "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
        "server": sorted(m for m in sys.modules if m.startswith("bentowhisper.server.")),
        "services": [service.BentoWhisper.name, service.WhisperModel.name],
        "mel": list(features(__import__("numpy").zeros(16000, "float32")).shape),
        "eot": vocab.eot,
    }))
    """
)


def test_the_api_side_imports_no_torch(converted_models_dir) -> None:
    child = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(converted_models_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "BENTOWHISPER_MODEL": "tiny.en"},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    found = json.loads(child.stdout.strip().splitlines()[-1])
    assert found["torch"] == []
    modules = {path.stem for path in SERVER.glob("*.py") if path.stem != "__init__"}
    assert {name.rsplit(".", 1)[1] for name in found["server"]} >= modules
    assert found["services"] == ["bentowhisper", "whisper-model"]
    assert found["mel"] == [80, 3000]
    assert found["eot"] > 0


def test_the_server_package_does_not_reach_into_the_engine() -> None:
    """The API package talks to the engine only through ``wire`` (and the model service)."""
    offenders = []
    for path in SERVER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                if "engine" in module.split(".") or module.startswith(("torch", "transformers")):
                    offenders.append(f"{path.name}: from {module}")
            elif isinstance(node, ast.Import):
                offenders += [
                    f"{path.name}: import {alias.name}"
                    for alias in node.names
                    if alias.name.split(".")[0] in {"torch", "transformers"}
                ]
    assert offenders == []


@pytest.mark.parametrize("model", ["tiny.en", "base"])
def test_numpy_log_mel_matches_whisper_feature_extractor(converted_models_dir, model) -> None:
    from transformers import WhisperFeatureExtractor

    from bentowhisper.server.audio import decode_audio
    from bentowhisper.server.features import LogMel

    checkpoint = converted_models_dir / model
    reference = WhisperFeatureExtractor.from_pretrained(checkpoint)
    ours = LogMel.from_checkpoint(checkpoint)
    speech = decode_audio(EVAL_DIR / "audio/en_misc/jfk.flac")
    noise = np.random.default_rng(0).standard_normal(40 * 16000).astype(np.float32) * 0.1
    cases = {
        "speech": speech,  # 11 s, zero-padded to 30 s
        "short": speech[:8000],
        "silence": np.zeros(30 * 16000, np.float32),
        "long noise": noise,  # cut to 30 s
    }
    for name, samples in cases.items():
        expected = reference(samples, sampling_rate=16000, return_tensors="np").input_features[0]
        got = ours(samples)
        assert got.dtype == np.float32 and got.shape == expected.shape == (80, 3000), name
        assert np.abs(got - expected).max() < 1e-4, (name, np.abs(got - expected).max())
