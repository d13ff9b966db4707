"""benchmarks/gpu_check.sh end to end on this CPU (``--cpu-smoke``), and the bundle it carries.

The bundle is built from the real embedded tiny.en (int8 weights, two real clips with jfk first,
the tokens the CPU decodes from them); the smoke run then goes through every part the GPU run
has: the engine's checks through ``decode_batch``, the engine's speed on a random-weight model
with a fixed token budget, and the decoder-step variants (whose CUDA-graph part needs CUDA and
says so). Only the shapes, batch sizes and token counts are smaller, and bf16 runs fewer checks
(none on a CPU without bf16 instructions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu_check import QUANT_MIN_ELEMENTS, dequantize, quantize

from bentowhisper.engine.loading import cpu_features

REPO_ROOT = Path(__file__).resolve().parents[1]

TIMEOUT_S = 900


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT / "tests")]),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PY": sys.executable,
    }


def test_quantize_roundtrip() -> None:
    torch.manual_seed(0)
    tensors = {
        "big": torch.randn(512, 256) * torch.linspace(0.01, 3, 512)[:, None],  # row scales vary
        "small": torch.randn(64, 64),
        "bias": torch.randn(512),
    }
    packed = quantize(tensors)
    assert packed["big"].dtype == torch.int8 and packed["big.__scale"].shape == (512,)
    assert packed["small"].dtype == torch.float16 and packed["bias"].dtype == torch.float16
    assert tensors["big"].numel() >= QUANT_MIN_ELEMENTS > tensors["small"].numel()
    restored = dequantize(packed)
    assert set(restored) == set(tensors)
    # per row, the error is at most half a step of that row's scale
    step = tensors["big"].abs().amax(dim=1, keepdim=True) / 127
    assert ((restored["big"] - tensors["big"]).abs() <= step / 2 + 1e-6).all()
    assert torch.allclose(restored["small"], tensors["small"], atol=2e-3)


@pytest.fixture(scope="module")
def bundle(converted_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "bundle"
    command = [sys.executable, str(REPO_ROOT / "benchmarks/gpu_check.py"), "bundle"]
    command += ["--out", str(out), "--clips", "2", "--no-wheels"]
    command += ["--models-dir", str(converted_models_dir)]
    done = subprocess.run(
        command, env=env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "with the repository" in done.stdout
    return out


def test_bundle(bundle: Path) -> None:
    weights = bundle / "tiny.en" / "model.int8.safetensors"
    assert 30 * 2**20 < weights.stat().st_size < 45 * 2**20  # int8: half of fp16's 72 MiB
    for name in ("tiny.en", "base"):
        assert (bundle / name / "tokenizer.json.gz").is_file()
        assert (bundle / name / "generation_config.json.gz").is_file()
    expected = json.loads((bundle / "expected.json").read_text())
    assert next(iter(expected["clips"])) == "jfk"
    jfk = expected["clips"]["jfk"]
    assert "ask not what your country can do for you" in jfk["int8_text"].lower()
    assert jfk["int8_text"] == jfk["original_text"]  # int8 did not change jfk
    assert expected["jfk_token_times"]


def test_cpu_smoke(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks/gpu_check.sh"), "--cpu-smoke"],
        env={**env(), "BUNDLE": str(bundle), "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "all cases that ran passed" in done.stdout
    assert (out / "gpu-check.log").read_text() == done.stdout
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["settings"]["mode"] == "cpu-smoke"
    assert report["environment"]["torch"] == torch.__version__

    checks = report["checks"]
    for case in ("load", "alone_vs_cpu", "batch_vs_alone", "slices_vs_whole"):
        assert checks[f"float32/{case}"]["status"] == "ok", (case, checks)
    for case in ("word_timestamps", "sampling_t0.5"):
        assert checks[f"float32/{case}"]["status"] == "ok", (case, checks)
    # bf16 on jfk, where its verdicts differ from fp32's, on a CPU that computes bf16
    if cpu_features().bf16:
        for case in ("load", "alone_vs_cpu", "batch_vs_alone"):
            assert checks[f"bfloat16/{case}"]["status"] == "ok", (case, checks)
        assert "bfloat16/slices_vs_whole" not in checks
    else:
        assert not any(name.startswith("bfloat16/") for name in checks), checks
    fp32 = checks["float32/alone_vs_cpu"]
    assert fp32["clips_tokens_as_cpu"] == "2 of 2" and fp32["jfk_as_original_weights_on_cpu"]
    assert checks["float32/batch_vs_alone"]["rows_as_alone"] == "2 of 2"
    assert checks["float32/slices_vs_whole"]["calls"] > 1  # really resumed in slices
    assert checks["float32/slices_vs_whole"]["cache_left"] == 0

    engine = report["engine"]
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 2):
            entry = engine[f"smoke/{dtype}/batch{batch}"]
            assert entry["status"] == "ok", entry
            assert entry["tokens_per_window"] == 4  # the fixed budget: no window stopped early
            # the encoder is timed apart, so on this loaded machine its share can exceed 1
            assert entry["windows_per_s"] > 0 and entry["encoder_share"] > 0
            assert entry["audio_s_per_s"] == pytest.approx(entry["windows_per_s"] * 30, rel=0.01)

    step = report["step"]["smoke/float32/batch2"]
    assert step["status"] == "ok", step
    assert step["static_vs_transformers_rel_err"] < 1e-4  # the static step is the same function
    assert step["engine_eager_ms"] > 0 and step["static_eager_ms"] > 0
    assert step["graph"] == "skipped: no CUDA"


def test_budget_skips_cases(bundle: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(REPO_ROOT / "benchmarks/gpu_check.py"), "run", "--cpu-smoke"]
    done = subprocess.run(
        [*command, "--bundle", str(bundle), "--out", str(tmp_path), "--budget-s", "0"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    entries = [e for section in ("checks", "engine") for e in report[section].values()]
    entries = [e for e in entries if "status" in e]
    assert entries and all(e["status"] == "skipped" for e in entries)
    assert "time budget" in entries[0]["reason"]
