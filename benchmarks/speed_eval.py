"""Precision variants in-process: word error rate per language and decoding time, interleaved.

Loads one model in every ``--variants`` setting (``dtype/quantization`` pairs, e.g.
``float32/none float32/int8:decoder,proj_out``), then transcribes each clip with every
variant in turn (A B C A B C ...), so that the machine's load falls on all of them alike; the
time ratios are what to read on a shared machine. Clips: the English dev set (≤ 30 s) and, for
multilingual models, FLEURS de, fr, es, pt; the language is detected, as ``evaluate.py`` does
through the server. Scores use ``evaluate.py``'s normalisers.

    .venv/bin/python benchmarks/speed_eval.py --model base \\
        --variants float32/none float32/int8:decoder,proj_out --out docs/results/x.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from evaluate import DEFAULT_MANIFEST, aggregate, load_manifest, row_score, score_clip, select_clips
from rtf import DEFAULT_MODELS_DIR, direct_decode, load_average, transcribe_once

from bentowhisper.engine.checkpoints import EMBEDDED, ensure_converted
from bentowhisper.engine.loading import load_whisper
from bentowhisper.server.audio import decode_audio

ENGLISH_DEV = ["en_ljspeech", "en_librispeech", "en_misc", "fleurs_en"]
OTHER = ["fleurs_de", "fleurs_fr", "fleurs_es", "fleurs_pt"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--variants", nargs="+", default=["float32/none"])
    parser.add_argument("--attn", default="hybrid")
    parser.add_argument("--groups", nargs="+", help="default: English dev (+ de/fr/es/pt)")
    parser.add_argument("--limit", type=int, help="first N clips only")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    english_only = args.model.endswith(".en")
    groups = args.groups or (ENGLISH_DEV if english_only else ENGLISH_DEV + OTHER)
    clips = select_clips(load_manifest(DEFAULT_MANIFEST), groups=groups, max_seconds=30.0)
    clips = clips[: args.limit] if args.limit else clips
    checkpoint = str(ensure_converted(EMBEDDED[args.model], args.models_dir))
    bundles = {}
    for variant in args.variants:
        dtype, quantization = variant.split("/")
        bundles[variant] = load_whisper(
            checkpoint, device="cpu", dtype=dtype, quantization=quantization,
            attn_implementation=args.attn,
        )  # fmt: skip
    seconds: dict[str, float] = defaultdict(float)
    cpu_seconds: dict[str, float] = defaultdict(float)  # steadier than wall time under load
    rows: dict[str, list[dict]] = defaultdict(list)
    load = [load_average()]

    async def run() -> None:
        for bundle in bundles.values():  # warm-up
            await transcribe_once(decode_audio(clips[0].path.read_bytes()), bundle,
                                  direct_decode(bundle), None)  # fmt: skip
        for clip in clips:
            audio = decode_audio(clip.path.read_bytes())
            for variant, bundle in bundles.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                text, _ = await transcribe_once(audio, bundle, direct_decode(bundle), None)
                seconds[variant] += time.perf_counter() - start
                cpu_seconds[variant] += time.process_time() - start_cpu
                rows[variant].append({"id": clip.id, "language": clip.language,
                                      "group": clip.group, "text": text,
                                      **score_clip(clip, text)})  # fmt: skip
            print(clip.id, {v: round(s, 1) for v, s in cpu_seconds.items()}, flush=True)

    asyncio.run(run())
    load.append(load_average())
    report = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "load_average_start_end": load,
        "clips": len(clips),
        "audio_s": sum(c.duration_s for c in clips),
        "variants": {},
    }
    base = args.variants[0]
    for variant in args.variants:
        by_language: dict[str, list] = defaultdict(list)
        for row in rows[variant]:
            key = "english_dev" if row["group"] in ENGLISH_DEV else row["language"]
            by_language[key].append(row_score(row))
        report["variants"][variant] = {
            "precision": bundles[variant].speed.describe(),
            "seconds": seconds[variant],
            "speed_vs_first": seconds[base] / seconds[variant],
            "cpu_seconds": cpu_seconds[variant],
            "cpu_speed_vs_first": cpu_seconds[base] / cpu_seconds[variant],
            "wer": {lang: aggregate(scores) for lang, scores in by_language.items()},
            "rows": rows[variant],
        }
        wer = {k: f"{v['errors']}/{v['ref_units']}" for k, v in
               report["variants"][variant]["wer"].items()}  # fmt: skip
        print(f"{variant}: {seconds[variant]:.1f} s ({seconds[base] / seconds[variant]:.2f}x "
              f"the first), CPU {cpu_seconds[variant]:.1f} s "
              f"({cpu_seconds[base] / cpu_seconds[variant]:.2f}x), errors {wer}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
