"""Chunked (``chunking_strategy=auto``) against the sequential long-form loop, in-process.

Both paths run the service's own code (``server/chunked.py``, ``server/longform.py``) on the
real model; decode calls that are pending together share one ``decode_batch`` call, as the
model service's adaptive batching does. Per clip group: pooled WER (Whisper's English
normaliser, jiwer) and the wall time of the whole group, its clips submitted at once.

    .venv/bin/python benchmarks/chunked_wer.py --model base --groups en_librispeech longform \\
        --out docs/results/chunked-wer.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

from bentowhisper.config import load_settings
from bentowhisper.engine.checkpoints import EMBEDDED, ensure_converted
from bentowhisper.engine.decoding import EncoderCache, decode_batch
from bentowhisper.engine.loading import WhisperBundle, load_whisper
from bentowhisper.server.audio import decode_audio
from bentowhisper.server.chunked import request_events
from bentowhisper.server.features import LogMel
from bentowhisper.server.longform import (
    TranscribeOptions,
    TranscriptionDone,
)
from bentowhisper.wire import DecodeJob, DecodeResult

EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"
ENGLISH = ["en_librispeech", "en_ljspeech", "en_misc", "fleurs_en", "longform"]


class Batcher:
    """Decode calls pending at the same moment go to one ``decode_batch`` call."""

    def __init__(self, bundle: WhisperBundle, max_batch: int) -> None:
        self.bundle, self.max_batch = bundle, max_batch
        self.pending: list[tuple[list[DecodeJob], asyncio.Future]] = []
        self.worker: asyncio.Task | None = None
        self.cache = EncoderCache(capacity=2 * max_batch)

    async def __call__(self, jobs: list[DecodeJob]) -> list[DecodeResult]:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((jobs, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while self.pending:
            await asyncio.sleep(0.01)  # let the calls made on this loop turn arrive
            batch, size = [], 0
            while self.pending and (not batch or size + len(self.pending[0][0]) <= self.max_batch):
                batch.append(self.pending.pop(0))
                size += len(batch[-1][0])
            flat = [job for jobs, _ in batch for job in jobs]
            results = await asyncio.to_thread(decode_batch, self.bundle, flat, self.cache)
            for jobs, future in batch:
                future.set_result(results[: len(jobs)])
                results = results[len(jobs) :]


async def run_group(
    bundle: WhisperBundle, clips: list[dict], strategy: str, max_batch: int, in_flight: int
) -> tuple[list[str], float]:
    settings = load_settings({"BENTOWHISPER_MAX_CHUNKS_IN_FLIGHT": str(in_flight)})
    decode = Batcher(bundle, max_batch)
    features = LogMel.from_checkpoint(bundle.checkpoint)
    options = TranscribeOptions(language="en", slice_tokens=settings.slice_tokens)

    async def one(clip: dict) -> str:
        audio = decode_audio(EVAL / clip["path"])
        events = request_events(audio, strategy, options, decode, bundle.vocab, features, settings)
        async for event in events:
            if isinstance(event, TranscriptionDone):
                return event.transcription.text
        raise AssertionError("no TranscriptionDone")

    started = time.perf_counter()
    texts = await asyncio.gather(*(one(clip) for clip in clips))
    return list(texts), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--groups", nargs="+", default=ENGLISH)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=4, help="max_chunks_in_flight")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    ensure_converted(EMBEDDED[args.model], args.models_dir)
    profile = load_settings({})
    bundle = load_whisper(
        str(args.models_dir / args.model),
        device="cpu",
        dtype=profile.dtype,
        attn_implementation=profile.attn_implementation,
    )
    normalise = EnglishTextNormalizer()
    clips = [json.loads(line) for line in (EVAL / "manifest.jsonl").read_text().splitlines()]
    report = []
    for group in args.groups:
        selected = [c for c in clips if c["path"].split("/")[1] == group]
        references = [normalise(c["text"]) for c in selected]
        for strategy in ("none", "auto"):
            texts, wall = asyncio.run(
                run_group(bundle, selected, strategy, args.max_batch, args.in_flight)
            )
            wer = jiwer.wer(references, [normalise(t) for t in texts])
            audio_s = sum(c["duration_s"] for c in selected)
            row = {"group": group, "chunking": strategy, "clips": len(selected)}
            row |= {"audio_s": round(audio_s, 1), "wall_s": round(wall, 1), "wer": round(wer, 4)}
            print(json.dumps(row), flush=True)
            report.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
