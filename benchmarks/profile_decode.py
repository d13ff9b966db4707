"""Where one request's time goes, in-process: FFmpeg, features, encoder, decoder steps, rules.

For each model, one clip (default jfk, 11 s) is taken through the engine's stages the way the
service does: FFmpeg decoding of the uploaded bytes (``decode_audio``), log-mel features, then
``decode_batch`` for its single window. Inside ``decode_batch`` the encoder, every decoder
forward pass (the prefill and each step), the output projection and openai-whisper's logit
rules (``_Rules.apply``) are timed by wrapping them; the rest of the decoding loop (sampling,
bookkeeping, KV-cache trimming) is what remains. Medians over ``--repeats`` runs after a
warm-up, with ``torch.get_num_threads()`` threads unless ``--threads`` says otherwise.

Last, the same ``decode_batch`` is timed on another thread than the one that loaded the model
(as a sync BentoML API would run it, on its worker pool), against the loading thread: on this
machine torch ran the model markedly slower there, which is why the model service runs all
model work on the one thread that loaded it (``service.py``).

    .venv/bin/python benchmarks/profile_decode.py --out docs/results/profile-decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rtf import CLIPS, DEFAULT_EVAL_DIR, DEFAULT_MODELS_DIR

from bentowhisper import decoding
from bentowhisper.audio import decode_audio
from bentowhisper.decoding import DecodeJob, decode_batch
from bentowhisper.models import EMBEDDED, ensure_converted, load_whisper
from bentowhisper.transcribe import WINDOW_SAMPLES, log_mel


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


def profile_once(bundle, data: bytes, language: str) -> dict[str, float]:
    """One request's stages, in seconds; decoder passes split into prefill and steps."""
    watch = Stopwatch()
    start = time.perf_counter()
    audio = decode_audio(data)
    watch.seconds["ffmpeg"] = time.perf_counter() - start
    start = time.perf_counter()
    mel = log_mel(bundle.feature_extractor)(audio[:WINDOW_SAMPLES])
    watch.seconds["features"] = time.perf_counter() - start

    model = bundle.model
    originals = (model.model.encoder.forward, model.model.decoder.forward, model.proj_out.forward)
    rules_apply = decoding._Rules.apply
    model.model.encoder.forward = watch.wrap("encoder", originals[0])
    model.model.decoder.forward = watch.wrap("decoder", originals[1])
    model.proj_out.forward = watch.wrap("proj_out", originals[2])
    decoding._Rules.apply = watch.wrap("rules", rules_apply)
    try:
        job = DecodeJob.for_window(mel, language=language, num_frames=len(audio) // 160)
        start = time.perf_counter()
        (result,) = decode_batch(bundle, [job])
        total = time.perf_counter() - start
    finally:
        model.model.encoder.forward, model.model.decoder.forward, model.proj_out.forward = originals
        decoding._Rules.apply = rules_apply
    assert result.error is None, result.error
    steps = watch.calls["rules"]
    accounted = sum(watch.seconds[k] for k in ("encoder", "decoder", "proj_out", "rules"))
    return {
        "ffmpeg": watch.seconds["ffmpeg"],
        "features": watch.seconds["features"],
        "decode_batch": total,
        "encoder": watch.seconds["encoder"],
        "decoder_passes": watch.seconds["decoder"],
        "proj_out": watch.seconds["proj_out"],
        "rules": watch.seconds["rules"],
        "loop_rest": total - accounted,
        "steps": steps,
        "tokens": len(result.tokens),
    }


def thread_comparison(bundle, data: bytes, language: str, repeats: int) -> tuple[float, float]:
    """Median ``decode_batch`` seconds on this (the loading) thread and on a pool thread."""
    audio = decode_audio(data)
    mel = log_mel(bundle.feature_extractor)(audio[:WINDOW_SAMPLES])
    job = DecodeJob.for_window(mel, language=language, num_frames=len(audio) // 160)

    def once() -> float:
        start = time.perf_counter()
        decode_batch(bundle, [job])
        return time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(once).result()  # warm-up of that thread
        other = statistics.median(pool.submit(once).result() for _ in range(repeats))
    loading = statistics.median(once() for _ in range(repeats))
    return loading, other


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--clip", default="jfk", choices=sorted(CLIPS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--eval-dir", type=Path, default=DEFAULT_EVAL_DIR)
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = (args.eval_dir / CLIPS[args.clip]).read_bytes()
    report: dict = {"clip": args.clip, "threads": torch.get_num_threads(), "models": {}}
    for name in args.models.split(","):
        bundle = load_whisper(
            str(ensure_converted(EMBEDDED[name], args.models_dir)), device="cpu", dtype="float32"
        )
        language = "en"
        profile_once(bundle, data, language)  # warm-up
        runs = [profile_once(bundle, data, language) for _ in range(args.repeats)]
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        per_step = median["decoder_passes"] / max(median["steps"], 1)
        loading, other = thread_comparison(bundle, data, language, args.repeats)
        report["models"][name] = {
            "median_s": median,
            "decoder_pass_ms": 1000 * per_step,
            "decode_batch_on_loading_thread_s": loading,
            "decode_batch_on_other_thread_s": other,
            "other_over_loading": other / loading,
        }
        print(
            f"{name}: decode_batch {loading * 1000:.0f} ms on the loading thread, "
            f"{other * 1000:.0f} ms on another ({other / loading:.2f}x)"
        )
        print(
            f"{name}: "
            + ", ".join(
                f"{k} {v * 1000:.0f} ms" if k not in ("steps", "tokens") else f"{k} {v:.0f}"
                for k, v in median.items()
            )
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
