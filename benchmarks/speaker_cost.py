"""What diarization adds to a transcription, in-process on one clip: the speaker encoder's time
against Whisper's on the same audio, in the same run (so the ratio holds under load).

For the AMI meeting clip (60 s, 4 speakers): Whisper (``--model``, word timestamps on, as the
diarized path decodes) through the engine's long-form loop; then VAD regions, the encoder on
all their 1.6 s windows (one batch, as a batched endpoint would get them) and the clustering.

    python benchmarks/speaker_cost.py [--model base] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import numpy as np
import rtf
import torch
from der import _encoder
from mixtures import EVAL_DIR, load

from bentowhisper.engine.checkpoints import EMBEDDED, ensure_converted
from bentowhisper.engine.loading import load_whisper
from bentowhisper.server import diarize as dz
from bentowhisper.server.longform import (
    TranscribeOptions,
    TranscriptionInfo,
    log_mel,
    transcribe_segments,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    audio = load(EVAL_DIR / "audio/multi_speaker/ami_ES2004a_750-810.wav")
    bundle = load_whisper(str(ensure_converted(EMBEDDED[args.model], rtf.DEFAULT_MODELS_DIR)))
    decode = rtf.direct_decode(bundle)
    encoder = _encoder()

    async def whisper() -> None:
        options = TranscribeOptions(language="en", word_timestamps=True)
        info = TranscriptionInfo(duration=len(audio) / 16000)
        features = log_mel(bundle.feature_extractor)
        async for _ in transcribe_segments(audio, options, decode, bundle.vocab, features, info):
            pass

    def stages() -> dict[str, float]:
        times = {}
        started = time.perf_counter()
        regions = dz.speech_regions(audio)
        times["vad_s"] = time.perf_counter() - started
        windows = dz.embed_jobs(audio, regions)
        started = time.perf_counter()
        results = encoder.embed(windows.jobs)
        times["encoder_s"] = time.perf_counter() - started
        started = time.perf_counter()
        dz.cluster(np.concatenate([r.array() for r in results]), 8)
        times["cluster_s"] = time.perf_counter() - started
        times["windows"] = len(windows.centers)
        return times

    asyncio.run(whisper())  # warm-up
    stages()
    rows = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        asyncio.run(whisper())
        rows.append({"whisper_s": time.perf_counter() - started, **stages()})
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    summary["encoder_over_whisper"] = summary["encoder_s"] / summary["whisper_s"]
    summary["torch_threads"] = torch.get_num_threads()
    summary["model"] = args.model
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
