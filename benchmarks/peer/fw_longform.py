"""faster-whisper on long files, in-process: ``BatchedInferencePipeline`` and sequential mode.

The peer's two ways through a long recording, on the same CTranslate2 weights we serve
(``benchmarks/peer/models/<name>``, made by ``setup.sh``): the batched pipeline (Silero VAD
chunks, ``batch_size`` 8, int8, greedy) and ``WhisperModel.transcribe`` (30 s windows one
after another, greedy, no VAD). Each file is transcribed once per mode after an untimed
warm-up; ``--concurrent N`` also times N copies of the first file one after another (the
pipeline serves one file at a time). Prints JSON: per mode and file, seconds and text.
``--serve MODE`` instead answers one file per stdin line, for ``benchmarks/ab.py --peer``.

    benchmarks/peer/.venv/bin/python benchmarks/peer/fw_longform.py --model base \\
        --files a.flac b.flac --out /tmp/fw-long.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARMUP_CLIP = "../shared/eval/audio/en_misc/jfk.flac"  # from the repository root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base")
    p.add_argument("--files", nargs="+", type=Path, default=[])
    p.add_argument(
        "--serve",
        choices=["batched", "sequential"],
        help="read a file path per stdin line, answer a JSON line {seconds, text} (ab.py)",
    )
    p.add_argument("--language", default="en")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cpu-threads", type=int, default=2)
    p.add_argument("--concurrent", type=int, default=4, help="copies of the first file")
    p.add_argument("--modes", nargs="+", default=["batched", "sequential"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not args.files and not args.serve:
        p.error("give --files, or --serve")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.cpu_threads)

    from faster_whisper import BatchedInferencePipeline, WhisperModel
    from faster_whisper.audio import decode_audio

    model = WhisperModel(
        str(HERE / "models" / args.model),
        device="cpu",
        compute_type="int8",
        cpu_threads=args.cpu_threads,
        num_workers=1,
    )
    batched = BatchedInferencePipeline(model=model)

    def transcribe(mode: str, audio) -> str:
        if mode == "batched":
            segments, _ = batched.transcribe(
                audio, language=args.language, beam_size=1, batch_size=args.batch_size
            )
        else:
            segments, _ = model.transcribe(audio, language=args.language, beam_size=1)
        return " ".join(s.text.strip() for s in segments)

    if args.serve:
        transcribe(args.serve, decode_audio(str(HERE.parents[1] / WARMUP_CLIP)))  # untimed
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            start = time.perf_counter()
            text = transcribe(args.serve, decode_audio(line.strip()))
            print(json.dumps({"seconds": time.perf_counter() - start, "text": text}), flush=True)
        return 0
    audios = {str(f): decode_audio(str(f)) for f in args.files}
    report: dict = {"model": args.model, "compute_type": "int8", "modes": {}}
    first = next(iter(audios.values()))
    for mode in args.modes:
        transcribe(mode, first[: 16000 * 20])  # warm-up, untimed
        runs = {}
        for name, audio in audios.items():
            t = time.perf_counter()
            text = transcribe(mode, audio)
            runs[name] = {"seconds": time.perf_counter() - t, "text": text}
            print(f"{mode} {Path(name).name}: {runs[name]['seconds']:.1f} s", flush=True)
        t = time.perf_counter()
        for _ in range(args.concurrent):
            transcribe(mode, first)
        concurrent_s = time.perf_counter() - t
        print(f"{mode} {args.concurrent} x first file: {concurrent_s:.1f} s", flush=True)
        report["modes"][mode] = {"files": runs, "concurrent_s": concurrent_s}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
