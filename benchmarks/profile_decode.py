"""Where a request's time goes, in-process: FFmpeg, features, encoder, decoder steps, rules.

1. One request: the clip (default jfk, 11 s) goes through the stages the service runs: FFmpeg
   decoding of the uploaded bytes (``decode_audio``), log-mel features, then ``decode_batch``
   for its single window. Inside ``decode_batch`` the encoder, every decoder forward pass (the
   prefill and one per token), the output projection, openai-whisper's logit rules
   (``_Rules.apply``) and the KV-cache trimming as rows finish are timed by wrapping them; the
   rest of the loop (sampling, bookkeeping) is what remains. The KV cache's growth by a token
   per step (``kv_append``) is timed too; it lies inside the decoder passes.
2. A batch: the first ``--batch`` English dev clips decoded one by one, then as one batch, with
   the same breakdown: what cross-request batching saves on this machine, stage by stage.
3. Threads: the same single-window ``decode_batch`` on another thread than the one that loaded
   the model (as a sync BentoML API would run it, on its worker pool) against the loading
   thread. Torch ran the model markedly slower there, which is why the model service runs all
   model work on the one thread that loaded it (``service.py``).

Medians over ``--repeats`` runs after a warm-up, in ``--dtype`` (default float32) with
``--attn`` (default sdpa), torch's thread count unless ``--threads`` says otherwise.

    .venv/bin/python benchmarks/profile_decode.py --out docs/results/profile-decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from evaluate import DEFAULT_MANIFEST, load_manifest, select_clips
from rtf import CLIPS, DEFAULT_EVAL_DIR, DEFAULT_MODELS_DIR
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

from bentowhisper.engine import decoding
from bentowhisper.engine.checkpoints import EMBEDDED, ensure_converted
from bentowhisper.engine.decoding import decode_batch
from bentowhisper.engine.loading import WhisperBundle, load_whisper
from bentowhisper.server.audio import decode_audio
from bentowhisper.server.features import LogMel
from bentowhisper.server.longform import HOP_LENGTH, WINDOW_SAMPLES
from bentowhisper.wire import DecodeJob

ENGLISH_DEV = ["en_ljspeech", "en_librispeech", "en_misc", "fleurs_en"]
STAGES = ("encoder", "decoder_passes", "proj_out", "rules", "kv_trim")
# Timed inside a stage above (not added to the sum): the self-attention KV cache growing by
# one token per layer and step (torch.cat).
NESTED = ("kv_append",)


class Stopwatch:
    """Seconds and calls accumulated per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


@contextmanager
def timing(bundle: WhisperBundle) -> Iterator[Stopwatch]:
    """Time the model's stages while the block runs."""
    watch = Stopwatch()
    model = bundle.model
    targets = [
        (model.model.encoder, "forward", "encoder"),
        (model.model.decoder, "forward", "decoder_passes"),
        (model.proj_out, "forward", "proj_out"),
        (decoding._Rules, "apply", "rules"),
        (EncoderDecoderCache, "batch_select_indices", "kv_trim"),
        (DynamicLayer, "update", "kv_append"),
    ]
    originals = [getattr(owner, attr) for owner, attr, _ in targets]
    for (owner, attr, name), original in zip(targets, originals, strict=True):
        setattr(owner, attr, watch.wrap(name, original))
    try:
        yield watch
    finally:
        for (owner, attr, _), original in zip(targets, originals, strict=True):
            if isinstance(owner, type):
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # back to the class's method


def window_job(bundle: WhisperBundle, audio) -> DecodeJob:
    mel = LogMel.from_checkpoint(bundle.checkpoint)(audio[:WINDOW_SAMPLES])
    return DecodeJob.for_window(
        mel, language="en", num_frames=min(len(audio), WINDOW_SAMPLES) // HOP_LENGTH
    )


def decode_stages(bundle: WhisperBundle, jobs: list[DecodeJob]) -> dict[str, float]:
    """``decode_batch`` of ``jobs``: its wall time and that of each stage, in seconds."""
    with timing(bundle) as watch:
        start = time.perf_counter()
        results = decode_batch(bundle, jobs)
        total = time.perf_counter() - start
    assert all(r.error is None for r in results), [r.error for r in results]
    stages = {name: watch.seconds[name] for name in STAGES}
    return {
        "decode_batch": total,
        **stages,
        "loop_rest": total - sum(stages.values()),
        **{name: watch.seconds[name] for name in NESTED},
        "steps": watch.calls["rules"],
    }


def one_request(bundle: WhisperBundle, data: bytes) -> dict[str, float]:
    start = time.perf_counter()
    audio = decode_audio(data)
    ffmpeg = time.perf_counter() - start
    start = time.perf_counter()
    job = window_job(bundle, audio)
    features = time.perf_counter() - start
    return {"ffmpeg": ffmpeg, "features": features, **decode_stages(bundle, [job])}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def batch_comparison(bundle: WhisperBundle, jobs: list[DecodeJob], repeats: int) -> dict:
    """Each job alone (stages summed over the jobs) against all of them in one batch."""
    decode_stages(bundle, jobs)  # warm-up at this batch size
    alone = []
    for _ in range(repeats):
        runs = [decode_stages(bundle, [job]) for job in jobs]
        alone.append({key: sum(run[key] for run in runs) for key in runs[0]})
    together = [decode_stages(bundle, jobs) for _ in range(repeats)]
    alone_median, together_median = median_of(alone), median_of(together)
    return {
        "windows": len(jobs),
        "alone_summed_s": alone_median,
        "batched_s": together_median,
        "speed_up": alone_median["decode_batch"] / together_median["decode_batch"],
    }


def thread_comparison(bundle: WhisperBundle, job: DecodeJob, repeats: int) -> dict:
    """Median ``decode_batch`` seconds on this (the loading) thread and on a pool thread."""

    def once() -> float:
        start = time.perf_counter()
        decode_batch(bundle, [job])
        return time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(once).result()  # warm-up of that thread
        other = statistics.median(pool.submit(once).result() for _ in range(repeats))
    loading = statistics.median(once() for _ in range(repeats))
    return {"loading_thread_s": loading, "other_thread_s": other, "ratio": other / loading}


def ms(values: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {v:.0f}" if k == "steps" else f"{k} {v * 1000:.0f} ms" for k, v in values.items()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--clip", default="jfk", choices=sorted(CLIPS))
    parser.add_argument("--batch", type=int, default=8, help="English dev clips in the batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (hybrid, sdpa)")
    parser.add_argument("--eval-dir", type=Path, default=DEFAULT_EVAL_DIR)
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = (args.eval_dir / CLIPS[args.clip]).read_bytes()
    dev = select_clips(load_manifest(DEFAULT_MANIFEST), groups=ENGLISH_DEV, ids=None)
    batch_audio = [decode_audio(clip.path.read_bytes()) for clip in dev[: args.batch]]
    report: dict = {
        "clip": args.clip,
        "dtype": args.dtype,
        "attn": args.attn,
        "threads": torch.get_num_threads(),
        "models": {},
    }
    for name in args.models.split(","):
        bundle = load_whisper(
            str(ensure_converted(EMBEDDED[name], args.models_dir)),
            device="cpu",
            dtype=args.dtype,
            attn_implementation=args.attn,
        )
        one_request(bundle, data)  # warm-up
        request = median_of([one_request(bundle, data) for _ in range(args.repeats)])
        batch = batch_comparison(
            bundle, [window_job(bundle, audio) for audio in batch_audio], args.repeats
        )
        threads = thread_comparison(bundle, window_job(bundle, decode_audio(data)), args.repeats)
        report["models"][name] = {"request_s": request, "batch": batch, "threads": threads}
        print(f"{name}, one request: {ms(request)}")
        print(f"{name}, {batch['windows']} windows alone (summed): {ms(batch['alone_summed_s'])}")
        print(f"{name}, the same in one batch: {ms(batch['batched_s'])}")
        print(
            f"{name}, batching speed-up {batch['speed_up']:.2f}x; decode_batch on the loading "
            f"thread {threads['loading_thread_s'] * 1000:.0f} ms, on another "
            f"{threads['other_thread_s'] * 1000:.0f} ms ({threads['ratio']:.2f}x)"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
