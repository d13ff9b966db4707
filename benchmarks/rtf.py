"""Real-time factor of the transcription engine, in-process (no server, no HTTP).

For each embedded model (tiny.en, base) and clip (jfk, 11 s; a 110 s long-form read), it runs
the engine's own long-form loop (:func:`bentowhisper.server.longform.transcribe` with
``decode_batch``) once to warm up and then ``--repeats`` times, and reports the median wall time
and the real-time factor RTF = audio seconds / wall seconds ("x real time"; higher is faster).

Then, per model, 8 x jfk: 8 transcriptions one after another versus the same 8 submitted
concurrently through a minimal asyncio micro-batcher (jobs that arrive within a few ms share one
``decode_batch`` call, at most one batch in flight, as BentoML's adaptive batching dispatcher
does in the service). The throughput ratio is sequential wall / concurrent wall, in the same run.

Audio decoding (FFmpeg) is done once, outside the timings. Thread counts are left as torch
decides; they are recorded, with versions and CPU facts, in the JSON written with ``--out``.

    .venv/bin/python benchmarks/rtf.py --out benchmarks/results/tmp/rtf.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from bentowhisper.engine.checkpoints import EMBEDDED, ensure_converted
from bentowhisper.engine.decoding import decode_batch
from bentowhisper.engine.loading import WhisperBundle, load_whisper
from bentowhisper.server.audio import SAMPLE_RATE, decode_audio
from bentowhisper.server.features import LogMel
from bentowhisper.server.longform import (
    DecodeFn,
    TranscribeOptions,
    TranscriptionDone,
    transcribe,
)
from bentowhisper.wire import DecodeJob, DecodeResult

REPO_ROOT = Path(__file__).resolve().parents[1]
# As tests/conftest.py: the shared eval set beside the clone, unless BENTOWHISPER_EVAL_DIR says.
DEFAULT_EVAL_DIR = Path(
    os.environ.get("BENTOWHISPER_EVAL_DIR") or REPO_ROOT.parent / "shared" / "eval"
)
DEFAULT_MODELS_DIR = Path(os.environ.get("BENTOWHISPER_MODELS_DIR") or REPO_ROOT / "models")
CLIPS = {
    "jfk": "audio/en_misc/jfk.flac",
    "longform": "audio/longform/ljspeech_LJ001-0001_to_0016.flac",
}


# --------------------------------------------------------------------------------------------
# decode functions: one window per call, or windows of concurrent requests batched together


def direct_decode(bundle: WhisperBundle) -> DecodeFn:
    """Each call decodes its own jobs at once, in a worker thread (as a batch of one)."""

    async def decode(jobs: list[DecodeJob]) -> list[DecodeResult]:
        return await asyncio.to_thread(decode_batch, bundle, jobs)

    return decode


@dataclass
class MicroBatcher:
    """Gathers the jobs submitted within ``window_ms`` of the first waiting one (up to
    ``max_batch_size``) into one ``decode_batch`` call in a thread; jobs arriving while it runs
    wait for the next batch. Create and use it inside one running event loop."""

    bundle: WhisperBundle
    max_batch_size: int = 8
    window_ms: float = 5.0
    batch_sizes: list[int] = field(default_factory=list)
    _queue: asyncio.Queue | None = None
    _worker: asyncio.Task | None = None

    async def decode(self, jobs: list[DecodeJob]) -> list[DecodeResult]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        for job, future in zip(jobs, futures, strict=True):
            self._queue.put_nowait((job, future))
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.window_ms / 1000
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            self.batch_sizes.append(len(batch))
            jobs = [job for job, _ in batch]
            try:
                results = await asyncio.to_thread(decode_batch, self.bundle, jobs)
            except Exception as exc:  # decode_batch reports per item; this is a bug guard
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)


# --------------------------------------------------------------------------------------------
# measurement


async def transcribe_once(
    audio: np.ndarray, bundle: WhisperBundle, decode: DecodeFn, language: str | None
) -> tuple[str, TranscriptionDone]:
    features = LogMel.from_checkpoint(bundle.checkpoint)
    options = TranscribeOptions(language=language)
    done = await transcribe(audio, options, decode, bundle.vocab, features)
    return done.transcription.text, done


def timed(coro_factory, repeats: int) -> tuple[list[float], object]:
    """Run ``coro_factory()`` once to warm up, then ``repeats`` times; return the wall times."""
    result = asyncio.run(coro_factory())
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = asyncio.run(coro_factory())
        walls.append(time.perf_counter() - started)
    return walls, result


def bench_clip(bundle, audio, language, repeats) -> dict:
    walls, (text, info) = timed(
        lambda: transcribe_once(audio, bundle, direct_decode(bundle), language), repeats
    )
    seconds = len(audio) / SAMPLE_RATE
    wall = statistics.median(walls)
    return {
        "audio_s": round(seconds, 3),
        "walls_s": [round(w, 3) for w in walls],
        "median_wall_s": round(wall, 3),
        "rtf": round(seconds / wall, 2),
        "windows": info.windows,
        "fallbacks": info.fallbacks,
        "language": info.transcription.language,
        "text": text,
    }


def bench_concurrency(bundle, audio, language, repeats, n, max_batch_size, window_ms) -> dict:
    async def sequential():
        decode = direct_decode(bundle)
        return [await transcribe_once(audio, bundle, decode, language) for _ in range(n)]

    batch_sizes: list[list[int]] = []  # per run, the size of each batch

    async def concurrent():
        batcher = MicroBatcher(bundle, max_batch_size=max_batch_size, window_ms=window_ms)
        try:
            return await asyncio.gather(
                *(transcribe_once(audio, bundle, batcher.decode, language) for _ in range(n))
            )
        finally:
            await batcher.close()
            batch_sizes.append(batcher.batch_sizes)

    seq_walls, seq_out = timed(sequential, repeats)
    conc_walls, conc_out = timed(concurrent, repeats)
    seq, conc = statistics.median(seq_walls), statistics.median(conc_walls)
    seconds = n * len(audio) / SAMPLE_RATE
    return {
        "requests": n,
        "audio_s": round(seconds, 3),
        "sequential_walls_s": [round(w, 3) for w in seq_walls],
        "concurrent_walls_s": [round(w, 3) for w in conc_walls],
        "sequential_median_s": round(seq, 3),
        "concurrent_median_s": round(conc, 3),
        "sequential_rtf": round(seconds / seq, 2),
        "concurrent_rtf": round(seconds / conc, 2),
        "throughput_ratio": round(seq / conc, 2),
        "batch_sizes_per_run": batch_sizes[1:],  # the timed runs (the first was the warm-up)
        "same_text": len({text for text, _ in seq_out} | {text for text, _ in conc_out}) == 1,
    }


# --------------------------------------------------------------------------------------------
# reporting


def machine() -> dict:
    cpu_model = ""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu_model = found.group(1) if found else ""
    except OSError:
        pass
    versions = {}
    for package in ("torch", "transformers", "numpy", "bentoml", "bentowhisper"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "versions": versions,
    }


def git_state() -> dict:
    """The commit measured, and whether the work tree differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class LoadSampler(threading.Thread):
    """The 1-minute load average every few seconds while the benchmark runs: on a shared
    machine it says how much of the noise other processes may account for."""

    def __init__(self, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.every_s, self.samples = every_s, []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            if (load := load_average()) is not None:
                self.samples.append(load[0])

    def summary(self) -> dict:
        self.stopped.set()
        if not self.samples:
            return {}
        return {
            "samples": len(self.samples),
            "mean": round(statistics.fmean(self.samples), 2),
            "max": max(self.samples),
        }


def markdown(report: dict) -> str:
    lines = []
    if report["clips"]:
        lines += [
            "| model | clip | audio (s) | median wall (s) | RTF (x real time) | windows"
            " | runs (s) |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
    for row in report["clips"]:
        lines.append(
            f"| {row['model']} | {row['clip']} | {row['audio_s']:.1f} | {row['median_wall_s']:.2f}"
            f" | {row['rtf']:.1f} | {row['windows']} | {', '.join(map(str, row['walls_s']))} |"
        )
    if report["concurrency"]:
        n = report["concurrency"][0]["requests"]
        lines += [
            *([""] if lines else []),
            f"| model | {n} x jfk | sequential (s) | concurrent, batched (s) "
            "| throughput ratio | batch sizes (one run) |",
            "|---|---|---:|---:|---:|---|",
        ]
        for row in report["concurrency"]:
            sizes = row["batch_sizes_per_run"][0] if row["batch_sizes_per_run"] else []
            lines.append(
                f"| {row['model']} | {row['audio_s']:.0f} s audio"
                f" | {row['sequential_median_s']:.2f} | {row['concurrent_median_s']:.2f}"
                f" | {row['throughput_ratio']:.2f}x | {sizes} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny.en,base", help="comma-separated embedded models")
    parser.add_argument("--clips", default="jfk,longform", help=f"of {', '.join(CLIPS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--concurrent", type=int, default=8, help="N for N x jfk; 0 skips it")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument(
        "--language", default=None, help="ISO code; default: detect, as a request without one"
    )
    parser.add_argument("--eval-dir", type=Path, default=DEFAULT_EVAL_DIR)
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--out", type=Path, help="write the full report as JSON here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)  # sampling happens only on temperature fallback; keep it repeatable
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    clips = [c.strip() for c in args.clips.split(",") if c.strip()]
    for name in models:
        if name not in EMBEDDED:
            parser.error(f"unknown model {name!r}; embedded: {', '.join(EMBEDDED)}")
    for name in clips:
        if name not in CLIPS:
            parser.error(f"unknown clip {name!r}; known: {', '.join(CLIPS)}")
    audio = {}
    for name in {*clips, "jfk"} if args.concurrent else clips:
        path = args.eval_dir / CLIPS[name]
        if not path.is_file():
            parser.error(f"{path} not found: pass --eval-dir (the shared eval set)")
        audio[name] = decode_audio(path)

    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "git": git_state(),
        "load_average_before": load_average(),
        "settings": {
            "repeats": args.repeats,
            "language": args.language,
            "dtype": "float32",
            "max_batch_size": args.max_batch_size,
            "batch_window_ms": args.batch_window_ms,
        },
        "clips": [],
        "concurrency": [],
    }
    sampler = LoadSampler()
    sampler.start()
    for name in models:
        checkpoint = ensure_converted(EMBEDDED[name], args.models_dir)
        bundle = load_whisper(str(checkpoint), device="cpu", dtype="float32", name=name)
        for clip in clips:
            print(f"{name} {clip} ...", file=sys.stderr, flush=True)
            row = bench_clip(bundle, audio[clip], args.language, args.repeats)
            report["clips"].append({"model": name, "clip": clip, **row})
            print(f"  {row['median_wall_s']} s, {row['rtf']}x", file=sys.stderr, flush=True)
        if args.concurrent:
            n = args.concurrent
            print(f"{name} {n} x jfk ...", file=sys.stderr, flush=True)
            row = bench_concurrency(
                bundle,
                audio["jfk"],
                args.language,
                args.repeats,
                n,
                args.max_batch_size,
                args.batch_window_ms,
            )
            report["concurrency"].append({"model": name, **row})
            print(f"  {row['throughput_ratio']}x", file=sys.stderr, flush=True)
        del bundle
    report["load_average_after"] = load_average()
    report["load_1min_during"] = sampler.summary()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    m = report["machine"]
    print(
        f"{m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['versions']['torch']} "
        f"({m['torch_threads']} threads), transformers {m['versions']['transformers']}; "
        f"load average before {report['load_average_before']}, "
        f"after {report['load_average_after']}, during (1 min) {report['load_1min_during']}\n"
    )
    print(markdown(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
