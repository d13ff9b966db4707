"""The GPU path in one prepared script: the engine's checks on real weights, then its speed on
large-v3-turbo- and large-v3-shaped models with random weights (issue 17).

Made for the ``device`` tool's GPU machine (/work/.library/device/): only its preinstalled
torch and transformers, no network, 64 MiB carried with the repository. Two steps:

1. Here (CPU, network): ``python benchmarks/gpu_check.py bundle`` (``make gpu-bundle``) packs
   what that machine lacks into ``.gpu-bundle/`` (ignored by git, carried by the ``run`` call):

   - tiny.en's real weights, int8: every weight matrix of 64k elements or more as int8 with one
     fp32 scale per output row (symmetric absmax), the rest fp16; 38 MiB, where fp16 is 72 MiB
     and the converted fp32 checkpoint 145 MiB. ``run`` dequantizes them into a transformers
     checkpoint there, loaded by the engine's own ``load_whisper``;
   - the tokenizer and config files of tiny.en and of base (base's multilingual vocabulary
     stands in for large-v3's in the random-weight models), gzipped;
   - 8 English clips of at most 30 s, jfk first, as 16 kHz int16 samples (no FFmpeg there);
   - ``expected.json``: each clip's tokens decoded here on the CPU in fp32 from those very int8
     weights (and jfk's word times), and from the original weights, for comparison;
   - ``wheels/``: pydantic and its dependencies for CPython 3.12 (``wire.py`` needs pydantic;
     the machine's image has none).

2. There: ``bash benchmarks/gpu_check.sh`` installs the wheels and runs ``gpu_check.py run``,
   which writes ``$OUT/gpu-check.json`` (rewritten after every case, so a kill keeps what ran)
   and prints a table last:

   - ``checks``: per dtype (float32, float16, bfloat16) through ``decode_batch``: each clip
     alone against the CPU's tokens and jfk's text, a batch of all clips against each alone,
     slices of 8 tokens resumed through the ``EncoderCache`` against whole windows, word
     timestamps, and sampling at temperature 0.5;
   - ``engine``: windows/s and audio-s/s of ``decode_batch`` at batch 1, 8, 32, 64, float16 and
     bfloat16, SDPA, with a fixed budget of ``--tokens`` tokens per window (the random models'
     <|endoftext|> logit is pinned to 0, so no window stops early), and the encoder's share;
   - ``step``: one decoder step (ms) at each batch size, as the engine runs it (transformers'
     decoder, dynamic KV cache, eager) against a static-KV re-implementation of the same step
     (checked against transformers' logits), eager, replayed as a CUDA graph, and, budget
     permitting, compiled with ``torch.compile``: whether graphs or compilation would pay.

   A time budget (``--budget-s``, default 450 s) skips the cases that no longer fit.

``run --cpu-smoke`` is the reduced mode for this CPU (tests/test_gpu_check.py runs it): the same
code on tiny shapes, batch 1 and 2, a few tokens, float32 and bfloat16 (its checks only on a CPU
with bf16 instructions, and fewer: see :func:`run_checks`).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO_ROOT / ".gpu-bundle"
DEFAULT_EVAL_DIR = Path(os.environ.get("BENTOWHISPER_EVAL_DIR") or REPO_ROOT.parent / "shared/eval")
DEFAULT_MODELS_DIR = Path(os.environ.get("BENTOWHISPER_MODELS_DIR") or REPO_ROOT / "models")
# The wheels the GPU machine's image lacks, as pinned in this venv (pydantic for wire.py; a
# typing-extensions as new as pydantic wants).
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
CLIP_GROUPS = ("en_misc", "en_ljspeech", "en_librispeech", "fleurs_en")
QUANT_MIN_ELEMENTS = 65536  # smaller tensors (norms, biases, positions, convs) stay fp16
CARRY_LIMIT = 64 * 2**20
SLICE = 8  # tokens per slice in the slices check
WINDOW_S = 30.0

# Shapes of the random-weight models (openai/whisper-large-v3-turbo's and large-v3's
# config.json); "smoke" is the CPU mode's stand-in.
SHAPES: dict[str, dict[str, int]] = {
    "large-v3-turbo": dict(d_model=1280, encoder_layers=32, decoder_layers=4, heads=20, ffn=5120),
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, heads=20, ffn=5120),
    "smoke": dict(d_model=64, encoder_layers=2, decoder_layers=2, heads=2, ffn=256),
}
LARGE_V3_VOCAB = 51866
LARGE_V3_MELS = 128


# --------------------------------------------------------------------------------------------
# the bundle: int8 weights (here: write; there: dequantize into a checkpoint)


def quantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 rows with fp32 absmax scales for large matrices (``name`` + ``name.__scale``)."""
    packed = {}
    for name, tensor in tensors.items():
        if tensor.ndim == 2 and tensor.numel() >= QUANT_MIN_ELEMENTS:
            scale = tensor.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
            packed[name] = (tensor.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            packed[f"{name}.__scale"] = scale
        else:
            packed[name] = tensor.to(torch.float16)
    return packed


def dequantize(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, tensor in packed.items():
        if name.endswith(".__scale"):
            continue
        if tensor.dtype == torch.int8:
            tensors[name] = tensor.float() * packed[f"{name}.__scale"][:, None]
        else:
            tensors[name] = tensor.float()
    return tensors


def materialize(bundle: Path, name: str, dest: Path) -> Path:
    """A transformers checkpoint directory of ``bundle/name`` in ``dest`` (fp32 safetensors)."""
    from safetensors.torch import load_file, save_file

    src, out = bundle / name, dest / name
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name.endswith(".json.gz"):
            (out / item.name[: -len(".gz")]).write_bytes(gzip.decompress(item.read_bytes()))
    weights = src / "model.int8.safetensors"
    if weights.exists():
        save_file(dequantize(load_file(weights)), out / "model.safetensors", {"format": "pt"})
    return out


@dataclass
class Clip:
    id: str
    audio: np.ndarray  # float32, 16 kHz mono


def load_clips(bundle: Path) -> list[Clip]:
    with np.load(bundle / "clips.npz") as data:
        ids = [str(i) for i in data["ids"]]
        return [Clip(i, data[f"pcm_{n}"].astype(np.float32) / 32768.0) for n, i in enumerate(ids)]


@functools.cache
def log_mel(checkpoint: str) -> Any:
    from bentowhisper.server.features import LogMel

    return LogMel.from_checkpoint(checkpoint)


def window_job(bundle: Any, audio: np.ndarray, **fields: Any) -> Any:
    """The DecodeJob the service sends for a clip of at most 30 s (longform's features)."""
    from bentowhisper.server.longform import HOP_LENGTH, window_features
    from bentowhisper.wire import N_FRAMES, DecodeJob

    frames = min(N_FRAMES, len(audio) // HOP_LENGTH)
    mel = window_features(log_mel(bundle.checkpoint), audio, frames)
    return DecodeJob.for_window(mel, num_frames=frames, **fields)


def make_bundle(args: argparse.Namespace) -> None:
    from evaluate import load_manifest, select_clips
    from safetensors.torch import load_file, save_file

    from bentowhisper.engine.checkpoints import EMBEDDED, ensure_converted
    from bentowhisper.engine.decoding import decode_batch
    from bentowhisper.engine.loading import load_whisper
    from bentowhisper.server.audio import decode_audio

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("tiny.en", "base"):
        checkpoint = ensure_converted(EMBEDDED[name], args.models_dir)
        (out / name).mkdir()
        for item in checkpoint.glob("*.json"):
            (out / name / f"{item.name}.gz").write_bytes(gzip.compress(item.read_bytes(), 9))
        if name == "tiny.en":
            original = load_file(checkpoint / "model.safetensors")
            save_file(quantize(original), out / name / "model.int8.safetensors")

    clips = select_clips(
        load_manifest(args.eval_dir / "manifest.jsonl"), groups=CLIP_GROUPS, max_seconds=WINDOW_S
    )
    clips.sort(key=lambda c: c.id != "jfk")  # jfk first: the text check reads it
    clips = clips[: args.clips]
    pcm = {}
    for n, clip in enumerate(clips):
        audio = decode_audio(clip.path.read_bytes())
        pcm[f"pcm_{n}"] = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
    np.savez(out / "clips.npz", ids=np.array([c.id for c in clips]), **pcm)

    # What the GPU must reproduce: the carried weights decoded here, fp32, each clip alone.
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        carried = materialize(out, "tiny.en", Path(tmp))
        loaded = {
            "int8": load_whisper(str(carried), device="cpu", dtype="float32", name="tiny.en"),
            "original": load_whisper(
                str(ensure_converted(EMBEDDED["tiny.en"], args.models_dir)),
                device="cpu",
                dtype="float32",
                name="tiny.en",
            ),
        }
        audios = load_clips(out)
        expected: dict[str, Any] = {"clips": {}, "quantization": {}}
        for kind, bundle in loaded.items():
            for clip in audios:
                (result,) = decode_batch(bundle, [window_job(bundle, clip.audio)])
                entry = expected["clips"].setdefault(clip.id, {})
                entry[f"{kind}_tokens"] = result.tokens
                entry[f"{kind}_text"] = bundle.vocab.decode(result.tokens)
        jfk = audios[0]
        (words,) = decode_batch(
            loaded["int8"], [window_job(loaded["int8"], jfk.audio, word_timestamps=True)]
        )
        expected["jfk_token_times"] = words.token_times
    same = [c["int8_tokens"] == c["original_tokens"] for c in expected["clips"].values()]
    expected["quantization"] = {
        "scheme": f"int8 rows + fp32 scales for matrices >= {QUANT_MIN_ELEMENTS} elements",
        "clips_with_identical_tokens": f"{sum(same)} of {len(same)}",
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1))

    if not args.no_wheels:
        download_wheels(out / "wheels")
    total = carried_bytes(out)
    print(json.dumps(expected["quantization"]))
    print(f"{out}: {dir_bytes(out) / 2**20:.1f} MiB; with the repository {total / 2**20:.1f} MiB")
    if total > CARRY_LIMIT:
        sys.exit(f"over the device tool's {CARRY_LIMIT / 2**20:.0f} MiB")
    rel = out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out
    print("\nfrom the repository root of the session's checkout, with the device tool:")
    print(f'  run(command="bash benchmarks/gpu_check.sh", carry=["{rel}"], timeout_s=540)')


def download_wheels(dest: Path) -> None:
    """This venv's versions of WHEELS, built for the device machine's CPython 3.12."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28, 34)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version=3.12", "--implementation=cp", *platforms, "-d", str(dest)]
    subprocess.run([*command, *pins], check=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def carried_bytes(bundle: Path) -> int:
    """What a ``run`` call sends: tracked and untracked-not-ignored files, plus the bundle."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [REPO_ROOT / os.fsdecode(f) for f in listed if f]
    return sum(f.stat().st_size for f in files if f.is_file()) + dir_bytes(bundle)


# --------------------------------------------------------------------------------------------
# the report and the time budget


class Report:
    """The JSON report, rewritten after every case."""

    def __init__(self, path: Path, started: float, budget_s: float) -> None:
        self.path, self.started, self.deadline = path, started, started + budget_s
        self.data: dict[str, Any] = {"environment": environment(), "checks": {}}
        self.rows: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def case(self, section: str, name: str, need_s: float, fn: Callable[[], dict]) -> dict:
        """Run one case unless fewer than ``need_s`` seconds are left; errors are recorded."""
        started = time.monotonic()
        if self.left() < need_s:
            entry = {"status": "skipped", "reason": f"time budget: {self.left():.0f} s left"}
        else:
            try:
                entry = {"status": "ok", **fn()}
            except Exception as exc:  # one failing case must not cost the others
                entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
                entry["traceback"] = traceback.format_exc(limit=6)[-3000:]
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        entry["seconds"] = round(time.monotonic() - started, 2)
        self.data.setdefault(section, {})[name] = entry
        self.save()
        summary = {k: v for k, v in entry.items() if k not in ("traceback", "detail")}
        line = f"{section:7s} {name:40s} {json.dumps(summary)[:400]}"
        self.rows.append(line)
        print(line, flush=True)
        return entry

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def environment() -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit"]
            env["nvidia_smi"] = subprocess.run(
                [*smi, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = str(exc)
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Seconds per call, after the caller's warm-up, synchronized around each call."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------
# checks: real tiny.en weights through decode_batch


def run_checks(
    report: Report, bundle_dir: Path, device: torch.device, dtypes: list[str], smoke: bool
) -> None:
    """The engine's checks in each dtype. ``smoke`` (on a CPU): half precision on jfk alone
    (the only clip it is held to, :class:`DtypeChecks`), and only the cases whose verdict
    differs by precision; fp32 runs the others through the same code."""
    from bentowhisper.engine.loading import load_whisper

    expected = json.loads((bundle_dir / "expected.json").read_text())
    clips = load_clips(bundle_dir)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    checkpoint = materialize(bundle_dir, "tiny.en", tmp)
    report.data["checks"]["quantization"] = expected["quantization"]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: compared with the CPU's
    torch.backends.cudnn.allow_tf32 = False
    for dtype in dtypes:
        loaded: list[Any] = []

        def load(dtype: str = dtype, loaded: list = loaded) -> dict:
            loaded.append(
                load_whisper(str(checkpoint), device=str(device), dtype=dtype, name="tiny.en")
            )
            return {}

        if report.case("checks", f"{dtype}/load", 20, load)["status"] != "ok":
            continue
        strict = dtype == "float32"
        checks = DtypeChecks(
            loaded.pop(), clips if strict or not smoke else clips[:1], expected, strict=strict
        )
        if report.case("checks", f"{dtype}/alone_vs_cpu", 30, checks.alone)["status"] == "error":
            continue
        report.case("checks", f"{dtype}/batch_vs_alone", 20, checks.batched)
        if smoke and not strict:
            continue
        report.case("checks", f"{dtype}/slices_vs_whole", 30, checks.sliced)
        report.case("checks", f"{dtype}/word_timestamps", 10, checks.words)
        report.case("checks", f"{dtype}/sampling_t0.5", 10, checks.sampling)
        del checks
    shutil.rmtree(tmp, ignore_errors=True)


class DtypeChecks:
    """The engine's checks on one loaded tiny.en. ``strict`` (fp32): batched, sliced and
    single decodes must agree token for token, and every clip's text must be the CPU's; in
    half precision a close call may come out differently (README), so only jfk must."""

    def __init__(self, bundle: Any, clips: list[Clip], expected: dict, strict: bool) -> None:
        self.bundle, self.clips, self.expected, self.strict = bundle, clips, expected, strict
        self.jfk = clips[0]
        self.singles: dict[str, list[int]] = {}

    def decode(self, jobs: list, cache: Any = None) -> list:
        from bentowhisper.engine.decoding import decode_batch

        results = decode_batch(self.bundle, jobs, cache)
        errors = [r.error for r in results if r.error]
        if errors:
            raise RuntimeError(errors[0])
        return results

    def job(self, clip: Clip, **fields: Any) -> Any:
        return window_job(self.bundle, clip.audio, **fields)

    def alone(self) -> dict:
        texts = {}
        for clip in self.clips:
            (result,) = self.decode([self.job(clip)])
            self.singles[clip.id] = result.tokens
            texts[clip.id] = self.bundle.vocab.decode(result.tokens)
        want = self.expected["clips"]
        same_tokens = sum(self.singles[i] == want[i]["int8_tokens"] for i in self.singles)
        same_text = sum(texts[i] == want[i]["int8_text"] for i in texts)
        jfk = self.jfk.id
        jfk_ok = texts[jfk] == want[jfk]["int8_text"] == want[jfk]["original_text"]
        passed = jfk_ok and (same_text == len(self.clips) or not self.strict)
        return {
            "status": "ok" if passed else "fail",
            "jfk_text": texts[jfk],
            "jfk_as_original_weights_on_cpu": jfk_ok,
            "clips_tokens_as_cpu": f"{same_tokens} of {len(self.clips)}",
            "clips_text_as_cpu": f"{same_text} of {len(self.clips)}",
            "detail": {i: t for i, t in texts.items() if t != want[i]["int8_text"]},
        }

    def _agree(self, tokens: dict[str, list[int]], key: str, extra: dict) -> dict:
        same = sum(tokens[c.id] == self.singles[c.id] for c in self.clips)
        jfk_ok = tokens[self.jfk.id] == self.singles[self.jfk.id]
        passed = same == len(self.clips) if self.strict else jfk_ok
        return {"status": "ok" if passed else "fail", key: f"{same} of {len(self.clips)}", **extra}

    def batched(self) -> dict:
        results = self.decode([self.job(clip) for clip in self.clips])
        tokens = {c.id: r.tokens for c, r in zip(self.clips, results, strict=True)}
        return self._agree(tokens, "rows_as_alone", {"batch": len(self.clips)})

    def sliced(self) -> dict:
        """Every window in slices of SLICE tokens, resumed as the long-form loop resumes them:
        later slices without features, from the encoder output the cache holds."""
        from bentowhisper.engine.decoding import EncoderCache

        cache = EncoderCache(capacity=len(self.clips))
        jobs = {c.id: self.job(c, max_steps=SLICE, key=c.id) for c in self.clips}
        final: dict[str, list[int]] = {}
        calls = 0
        while jobs:
            calls += 1
            results = self.decode(list(jobs.values()), cache)
            for (cid, job), result in zip(list(jobs.items()), results, strict=True):
                if result.evicted:
                    raise RuntimeError(f"{cid}: evicted from a cache that holds every window")
                if result.done:
                    final[cid] = result.tokens
                    del jobs[cid]
                else:
                    jobs[cid] = job.resumed(result)
        return self._agree(final, "windows_as_whole", {"calls": calls, "cache_left": len(cache)})

    def words(self) -> dict:
        (result,) = self.decode([self.job(self.jfk, word_timestamps=True)])
        times = result.token_times
        n_text = sum(t < self.bundle.vocab.eot for t in result.tokens)
        ordered = all(a <= b for a, b in itertools.pairwise(times))
        cpu = self.expected["jfk_token_times"]
        diff = max((abs(a - b) for a, b in zip(times, cpu, strict=False)), default=math.inf)
        passed = ordered and len(times) == n_text + 1 and times[0] >= 0 and times[-1] <= WINDOW_S
        return {
            "status": "ok" if passed else "fail",
            "tokens": n_text,
            "ordered": ordered,
            "max_diff_vs_cpu_s": round(diff, 3),
        }

    def sampling(self) -> dict:
        torch.manual_seed(0)
        results = self.decode([self.job(self.jfk, temperature=0.5)] * 4)
        texts = [self.bundle.vocab.decode(r.tokens) for r in results]
        passed = all(texts) and all(math.isfinite(r.avg_logprob) for r in results)
        return {"status": "ok" if passed else "fail", "texts": texts}


# --------------------------------------------------------------------------------------------
# speed: random weights in large-v3 shapes


def random_bundle(shape: str, dtype: torch.dtype, device: torch.device, vocab_dir: Path) -> Any:
    """A WhisperBundle of a random-weight model: the engine runs it like a loaded one."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    from bentowhisper.engine.loading import WhisperBundle

    s = SHAPES[shape]
    config = WhisperConfig(
        vocab_size=LARGE_V3_VOCAB,
        num_mel_bins=LARGE_V3_MELS,
        d_model=s["d_model"],
        encoder_layers=s["encoder_layers"],
        decoder_layers=s["decoder_layers"],
        encoder_attention_heads=s["heads"],
        decoder_attention_heads=s["heads"],
        encoder_ffn_dim=s["ffn"],
        decoder_ffn_dim=s["ffn"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = WhisperForConditionalGeneration._from_config(
            config, attn_implementation="sdpa", dtype=dtype
        )
    model.eval()
    model.requires_grad_(False)
    bundle = WhisperBundle(
        model=model,
        feature_extractor=WhisperFeatureExtractor(feature_size=LARGE_V3_MELS),
        device=device,
        dtype=dtype,
        name=shape,
        checkpoint=str(vocab_dir),
    )
    # A logit of 0 for <|endoftext|> never wins against ~50k random ones, so every window
    # samples its full token budget: the same work per window in every case.
    with torch.no_grad():
        model.proj_out.weight[bundle.vocab.eot] = 0
        model.model.decoder.embed_tokens.weight[bundle.vocab.eot] = 0
    return bundle


def run_engine(
    report: Report,
    shape: str,
    dtype: str,
    batches: list[int],
    tokens: int,
    device: torch.device,
    vocab_dir: Path,
    repeats: int,
    step_variants: bool,
    compile_batches: list[int],
    label: str = "build",
) -> None:
    from bentowhisper.engine.decoding import decode_batch
    from bentowhisper.wire import DecodeJob

    state: dict[str, Any] = {}
    torch_dtype = getattr(torch, dtype)

    def build() -> dict:
        start = time.perf_counter()
        state["bundle"] = random_bundle(shape, torch_dtype, device, vocab_dir)
        params = sum(p.numel() for p in state["bundle"].model.parameters())
        return {
            "params_m": round(params / 1e6, 1),
            "build_s": round(time.perf_counter() - start, 1),
        }

    if report.case("engine", f"{shape}/{dtype}/{label}", 30, build)["status"] != "ok":
        return
    bundle = state["bundle"]
    mel = np.random.default_rng(0).standard_normal((LARGE_V3_MELS, 3000)).astype(np.float32)
    job = DecodeJob.for_window(mel * 0.5, language="en", max_steps=tokens)

    for batch in batches:

        def case(batch: int = batch) -> dict:
            jobs = [job] * batch
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            decode_batch(bundle, jobs[:1])  # warm-up: kernels and their handles
            results = decode_batch(bundle, jobs)
            if results[0].error:
                raise RuntimeError(results[0].error)
            sampled = [len(r.tokens) for r in results]
            times = timed(lambda: decode_batch(bundle, jobs), device, repeats)
            features = torch.from_numpy(np.stack([job.mel()] * batch)).to(device, torch_dtype)
            with torch.inference_mode():
                encoder = timed(lambda: bundle.model.model.encoder(features), device, repeats)
            seconds = statistics.median(times)
            entry = {
                "batch": batch,
                "tokens_per_window": min(sampled),
                "s_per_batch": round(seconds, 4),
                "windows_per_s": round(batch / seconds, 2),
                "audio_s_per_s": round(batch * WINDOW_S / seconds, 1),
                "tokens_per_s": round(sum(sampled) / seconds, 1),
                "encoder_share": round(statistics.median(encoder) / seconds, 3),
                "runs_s": [round(t, 4) for t in times],
            }
            if device.type == "cuda":
                entry["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if min(sampled) != tokens:
                entry["status"] = "fail"  # a window stopped early: not the fixed budget
            return entry

        # a batch takes ~3 + repeats runs; the estimate grows with the batch
        report.case("engine", f"{shape}/{dtype}/batch{batch}", 8 + batch / 4, case)

    if step_variants:
        run_steps(report, bundle, shape, dtype, batches, device)
    if compile_batches:
        run_compiled(report, bundle, shape, dtype, compile_batches, device)


# --------------------------------------------------------------------------------------------
# one decoder step: as the engine runs it, against a static-KV step eager / graphed / compiled


class StaticStep:
    """One greedy decoder step of a Whisper decoder with preallocated self-attention K/V.

    The same arithmetic as transformers' decoder for one token (checked against it), written
    with fixed shapes and the position as a tensor, so that the step can be captured in a CUDA
    graph or compiled: what the engine would gain from either, measured without rewriting it.
    """

    def __init__(self, model: Any, encoded: torch.Tensor, prefix: torch.Tensor, n_ctx: int):
        decoder = model.model.decoder
        self.model, self.decoder = model, decoder
        batch, device, dtype = prefix.shape[0], prefix.device, encoded.dtype
        layer = decoder.layers[0].self_attn
        self.heads, self.head_dim = layer.num_heads, layer.head_dim
        shape = (len(decoder.layers), batch, self.heads, n_ctx, self.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.cross = [
            (self._split(attn.k_proj(encoded)), self._split(attn.v_proj(encoded)))
            for attn in (lay.encoder_attn for lay in decoder.layers)
        ]
        self.positions = torch.arange(n_ctx, device=device)
        # the prefix through transformers' decoder once, its K/V copied in
        out = decoder(input_ids=prefix, encoder_hidden_states=encoded, use_cache=True)
        cache = out.past_key_values.self_attention_cache
        for i in range(len(decoder.layers)):
            k, v = cache.layers[i].keys, cache.layers[i].values
            self.keys[i, :, :, : k.shape[2]] = k
            self.values[i, :, :, : v.shape[2]] = v
        logits = model.proj_out(out.last_hidden_state[:, -1])
        self.first = logits.argmax(-1, keepdim=True)
        self.token = self.first.clone()  # (batch, 1): the next input
        self.position = torch.tensor(prefix.shape[1], device=device)  # of that input
        self.start = prefix.shape[1]

    def reset(self) -> None:
        """Back to the first step after the prefix (later K/V slots are masked, then rewritten)."""
        self.token.copy_(self.first)
        self.position.fill_(self.start)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)

    def logits(self) -> torch.Tensor:
        """The next token's logits; writes this step's K/V at ``position``."""
        import torch.nn.functional as F

        dec = self.decoder
        # index_select, not weight[position]: a 0-d tensor index breaks torch.compile's graph
        x = dec.embed_tokens(self.token) + dec.embed_positions.weight.index_select(
            0, self.position.view(1)
        )
        visible = (self.positions <= self.position)[None, None, None]  # (1, 1, 1, n_ctx)
        for i, layer in enumerate(dec.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            q, k, v = (self._split(proj(h)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            self.keys[i].index_copy_(2, self.position[None], k)
            self.values[i].index_copy_(2, self.position[None], v)
            a = F.scaled_dot_product_attention(q, self.keys[i], self.values[i], attn_mask=visible)
            x = x + attn.out_proj(a.transpose(1, 2).reshape(x.shape))
            cross = layer.encoder_attn
            h = layer.encoder_attn_layer_norm(x)
            a = F.scaled_dot_product_attention(self._split(cross.q_proj(h)), *self.cross[i])
            x = x + cross.out_proj(a.transpose(1, 2).reshape(x.shape))
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        return self.model.proj_out(dec.layer_norm(x))[:, -1]

    def step(self) -> None:
        """One greedy step, in place: the graph-capturable unit."""
        self.token.copy_(self.logits().argmax(-1, keepdim=True))
        self.position.add_(1)


def engine_style_steps(model: Any, encoded: torch.Tensor, prefix: torch.Tensor, steps: int) -> list:
    """Greedy steps as decoding._sample runs them: transformers' decoder, its dynamic cache,
    the token read back each step. Returns (seconds per step, logits of the first step)."""
    decoder = model.model.decoder
    out = decoder(input_ids=prefix, encoder_hidden_states=encoded, use_cache=True)
    cache = out.past_key_values
    token = model.proj_out(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True)
    position = prefix.shape[1]
    first = None
    sync(encoded.device)
    start = time.perf_counter()
    for _ in range(steps):
        out = decoder(
            input_ids=token,
            position_ids=torch.full_like(token, position),
            encoder_hidden_states=encoded,
            past_key_values=cache,
            use_cache=True,
        )
        logits = model.proj_out(out.last_hidden_state[:, -1]).float()
        first = logits if first is None else first
        token = logits.argmax(-1, keepdim=True)
        token.tolist()  # the engine reads every step's tokens on the host
        position += 1
    sync(encoded.device)
    return [(time.perf_counter() - start) / steps, first]


def step_inputs(bundle: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output of random features, and the engine's prefix (English, transcribe)."""
    model, vocab = bundle.model, bundle.vocab
    mel = torch.randn(batch, LARGE_V3_MELS, 3000, device=bundle.device, dtype=model.dtype) * 0.5
    prefix = [vocab.sot, vocab.language_tokens["en"], vocab.task_tokens["transcribe"]]
    encoded = model.model.encoder(mel).last_hidden_state
    return encoded, torch.tensor([prefix] * batch, device=bundle.device)


def step_count(device: torch.device) -> int:
    return 8 if device.type == "cpu" else 40


def run_steps(
    report: Report, bundle: Any, shape: str, dtype: str, batches: list[int], device: torch.device
) -> None:
    model = bundle.model
    n_ctx = model.config.max_target_positions
    steps = step_count(device)

    for batch in batches:

        def case(batch: int = batch) -> dict:
            with torch.inference_mode():
                encoded, prefix = step_inputs(bundle, batch)
                engine_style_steps(model, encoded, prefix, 2)  # warm-up
                eager_s, reference = engine_style_steps(model, encoded, prefix, steps)
                static = StaticStep(model, encoded, prefix, n_ctx)
                first = static.logits().float()
                error = float((first - reference).norm() / reference.norm())
                for _ in range(3):
                    static.step()
                static_s = statistics.median(timed(static.step, device, steps))
                entry: dict[str, Any] = {
                    "batch": batch,
                    "engine_eager_ms": round(eager_s * 1e3, 3),
                    "static_eager_ms": round(static_s * 1e3, 3),
                    "static_vs_transformers_rel_err": float(f"{error:.2e}"),
                }
                tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
                if not error < tolerance:
                    entry["status"] = "fail"
                if device.type != "cuda":
                    entry["graph"] = "skipped: no CUDA"
                    return entry
                # eager tokens of 5 steps, then the same 5 steps replayed from a CUDA graph
                static.reset()
                eager_tokens = []
                for _ in range(5):
                    static.step()
                    eager_tokens.append(static.token.clone())
                static.reset()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # records the step; runs nothing
                    static.step()
                graph_tokens = []
                for _ in range(5):
                    graph.replay()
                    graph_tokens.append(static.token.clone())
                same = all(
                    torch.equal(a, b) for a, b in zip(graph_tokens, eager_tokens, strict=True)
                )
                entry["graph_tokens_as_eager"] = same
                if not same:
                    entry["status"] = "fail"
                graph_s = statistics.median(timed(graph.replay, device, steps))
                entry["static_graph_ms"] = round(graph_s * 1e3, 3)
                entry["graph_speedup_vs_engine"] = round(eager_s / graph_s, 2)
                return entry

        report.case("step", f"{shape}/{dtype}/batch{batch}", 10 + batch / 8, case)


def run_compiled(
    report: Report, bundle: Any, shape: str, dtype: str, batches: list[int], device: torch.device
) -> None:
    """The static step through ``torch.compile`` (last: compiling can take minutes)."""
    model = bundle.model
    n_ctx = model.config.max_target_positions
    steps = step_count(device)
    for batch in batches:

        def compiled(batch: int = batch) -> dict:
            with torch.inference_mode():
                encoded, prefix = step_inputs(bundle, batch)
                static = StaticStep(model, encoded, prefix, n_ctx)
                step = torch.compile(static.step, mode="reduce-overhead", fullgraph=False)
                start = time.perf_counter()
                for _ in range(3):
                    step()
                sync(device)
                compile_s = time.perf_counter() - start
                seconds = statistics.median(timed(step, device, steps))
            return {"batch": batch, "compile_s": round(compile_s, 1),
                    "compiled_graph_ms": round(seconds * 1e3, 3)}  # fmt: skip

        report.case("step", f"{shape}/{dtype}/compiled_batch{batch}", 150, compiled)


# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.cpu_smoke:
        device = torch.device("cpu")
        shapes, dtypes_bench, batches = ["smoke"], ["float32", "bfloat16"], [1, 2]
        from bentowhisper.engine.loading import cpu_features

        # bf16's checks where the CPU computes bf16; emulated (AVX2) they took a minute
        check_dtypes = ["float32", "bfloat16"] if cpu_features().bf16 else ["float32"]
        tokens, repeats, compile_batches = 4, 1, []
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --cpu-smoke on a CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shapes, dtypes_bench = ["large-v3-turbo", "large-v3"], ["float16", "bfloat16"]
        batches, check_dtypes = args.batches, ["float32", "float16", "bfloat16"]
        tokens, repeats, compile_batches = args.tokens, args.repeats, args.compile_batches
    budget_s = args.budget_s if args.budget_s is not None else 3600 if args.cpu_smoke else 450
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu-check.json", started, budget_s)
    report.data["settings"] = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "bundle": str(args.bundle),
        "tokens_per_window": tokens,
        "batches": batches,
        "repeats": repeats,
        "budget_s": budget_s,
        "attn_implementation": "sdpa",
    }
    report.save()
    run_checks(report, args.bundle, device, check_dtypes, smoke=args.cpu_smoke)
    # fp16 of both shapes first (the GPU profile's dtype), then bf16; step variants for each
    order = [(s, d) for d in dtypes_bench for s in shapes]
    vocab_dir = materialize(args.bundle, "base", Path(tempfile.mkdtemp(prefix="gpu-check-")))
    for shape, dtype in order:
        run_engine(
            report,
            shape,
            dtype,
            batches,
            tokens,
            device,
            vocab_dir,
            repeats,
            step_variants=True,
            compile_batches=[],
        )
    if compile_batches:  # turbo in fp16 again, after everything else
        run_engine(
            report,
            "large-v3-turbo",
            "float16",
            [],
            tokens,
            device,
            vocab_dir,
            repeats,
            step_variants=False,
            compile_batches=compile_batches,
            label="rebuild_for_compile",
        )
    shutil.rmtree(vocab_dir.parent, ignore_errors=True)
    report.save()
    print("\n".join(["", "summary:", *report.rows]))
    failed = [
        f"{section}/{name}"
        for section in ("checks", "engine", "step")
        for name, entry in report.data.get(section, {}).items()
        if isinstance(entry, dict) and entry.get("status") in ("fail", "error")
    ]
    print(f"{len(failed)} failed: {failed}" if failed else "all cases that ran passed")
    print(f"report: {report.path} ({report.data['elapsed_s']} s)")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bundle = sub.add_parser("bundle", help="pack what the GPU machine lacks (run here)")
    bundle.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    bundle.add_argument("--clips", type=int, default=8, help="English clips of <= 30 s, jfk first")
    bundle.add_argument("--eval-dir", type=Path, default=DEFAULT_EVAL_DIR)
    bundle.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    bundle.add_argument("--no-wheels", action="store_true", help="skip the pydantic wheels")
    check = sub.add_parser("run", help="checks and measurements (on the GPU machine)")
    check.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    check.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "build/gpu-check")))
    check.add_argument(
        "--budget-s", type=float, help="cases that no longer fit are skipped (450; smoke: 3600)"
    )
    check.add_argument("--tokens", type=int, default=64, help="token budget per window")
    check.add_argument(
        "--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64]
    )
    check.add_argument("--repeats", type=int, default=3)
    check.add_argument(
        "--compile-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 32]
    )
    check.add_argument("--cpu-smoke", action="store_true", help="reduced mode on this CPU")
    args = parser.parse_args()
    if args.command == "bundle":
        make_bundle(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
