"""Long files, in one run: our chunked path and our sequential loop against faster-whisper's
``BatchedInferencePipeline`` (batch 8, int8, greedy) and its sequential mode, same weights.

Files: the dev set's 106 s long-form clip and a file of 10+ minutes assembled here from the
English dev clips with pauses between them (its reference is their texts in order). For each
of our two server settings (``BENTOWHISPER_CHUNKING=auto`` and ``none``) it measures, on a
fresh server after a warm-up: each file alone (latency, WER); four copies of the 106 s file
at once (wall time); and short requests' p95 while two long files run (``hol.py
--long-clients 2``). Then faster-whisper in-process on the same files
(``peer/fw_longform.py``). Writes ``longform.json`` and ``longform.md`` under ``--out``.

    .venv/bin/python benchmarks/longform.py --model base --out docs/results/longform

The peer needs ``benchmarks/peer/setup.sh`` first. Only loopback addresses are contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
from evaluate import load_manifest, normalise

from bentowhisper.launcher import start_server
from bentowhisper.server.audio import SAMPLE_RATE, decode_audio, find_ffmpeg

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PEER_PY = REPO / "benchmarks/peer/.venv/bin/python"
EVAL = REPO.parent / "shared" / "eval"
JFK = EVAL / "audio/en_misc/jfk.flac"
LONGFORM_ID = "ljspeech_LJ001-0001_to_0016"
ENGLISH_DEV = ("en_ljspeech", "en_librispeech", "en_misc", "fleurs_en")
VARIANTS = {
    "chunked": {"BENTOWHISPER_CHUNKING": "auto"},
    "sequential": {"BENTOWHISPER_CHUNKING": "none"},
}
PAUSE_S = 1.0
CONCURRENT = 4
WARMUP = 12  # jfk requests before anything is timed (warm_up)


def assemble(out_dir: Path, seconds: float) -> tuple[Path, str]:
    """English dev clips in manifest order, cycled, with PAUSE_S of silence between them."""
    clips = [c for c in load_manifest(EVAL / "manifest.jsonl") if c.group in ENGLISH_DEV]
    pieces, texts, total = [], [], 0.0
    pause = np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)
    while total < seconds:
        for clip in clips:
            audio = decode_audio(Path(clip.path).read_bytes())
            pieces += [audio, pause]
            texts.append(clip.text)
            total += len(audio) / SAMPLE_RATE + PAUSE_S
            if total >= seconds:
                break
    path = out_dir / f"assembled-{int(total)}s.flac"
    subprocess.run(
        [find_ffmpeg(), "-y", "-loglevel", "error", "-f", "f32le", "-ar", str(SAMPLE_RATE),
         "-ac", "1", "-i", "-", str(path)],
        input=np.concatenate(pieces).tobytes(), check=True,
    )  # fmt: skip
    return path, " ".join(texts)


def wer(reference: str, hypothesis: str) -> float:
    return jiwer.wer(normalise(reference, "en"), normalise(hypothesis, "en") or "-")


async def transcribe(client, path: Path) -> tuple[float, str]:
    t = time.perf_counter()
    with path.open("rb") as f:
        result = await client.audio.transcriptions.create(
            model="whisper-1", file=f, language="en", response_format="text"
        )
    return time.perf_counter() - t, str(result)


async def warm_up(client) -> None:
    """Untimed jfk requests past BentoML's batcher training, whose first 11 dispatches take
    1-3 calls each, however many are waiting."""
    for _ in range(WARMUP):
        await transcribe(client, JFK)


async def measure_ours(base_url: str, files: dict[str, Path], out: Path, label: str) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", timeout=1800, max_retries=0)
    await warm_up(client)
    report: dict = {"files": {}}
    for name, path in files.items():
        seconds, text = await transcribe(client, path)
        report["files"][name] = {"seconds": seconds, "text": text}
        print(f"{label} {name}: {seconds:.1f} s", flush=True)
    first = next(iter(files.values()))
    t = time.perf_counter()
    await asyncio.gather(*(transcribe(client, first) for _ in range(CONCURRENT)))
    report["concurrent_s"] = time.perf_counter() - t
    print(f"{label} {CONCURRENT} x {first.name} at once: {report['concurrent_s']:.1f} s")
    await client.close()
    hol = out / f"hol-{label}.json"
    subprocess.run(
        [PY, "benchmarks/hol.py", "--base-url", base_url, "--model", "whisper-1",
         "--long", str(first), "--long-clients", "2", "--warmup", "4", "--short-requests", "12",
         "--language", "en", "--out", str(hol)],
        check=True, cwd=REPO,
    )  # fmt: skip
    report["hol"] = json.loads(hol.read_text())
    return report


def summarise(report: dict, references: dict[str, str], durations: dict[str, float]) -> str:
    rows = ["| system | file | seconds | x real time | WER |", "|---|---|---:|---:|---:|"]
    for system, runs in report["systems"].items():
        for name, run in runs["files"].items():
            rtf = durations[name] / run["seconds"]
            err = wer(references[name], run["text"])
            run["wer"] = err
            rows.append(f"| {system} | {name} | {run['seconds']:.1f} | {rtf:.1f} | {err:.1%} |")
    rows += ["", f"| system | {CONCURRENT} x 106 s file, wall seconds |", "|---|---:|"]
    rows += [f"| {s} | {r['concurrent_s']:.1f} |" for s, r in report["systems"].items()]
    rows += [
        "",
        "| server | short p95 idle | short p95 with 2 long files | ratio |",
        "|---|---:|---:|---:|",
    ]
    for s, r in report["systems"].items():
        if "hol" in r:
            h = r["hol"]
            idle, loaded = h["idle"]["p95"], h["loaded"]["p95"]
            rows.append(f"| {s} | {idle:.2f} | {loaded:.2f} | {h['ratio_p95']:.2f} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base")
    p.add_argument("--seconds", type=float, default=600.0, help="length of the assembled file")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--skip-peer", dest="peer", action="store_false")
    p.add_argument("--out", type=Path, default=REPO / "docs/results/longform")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    longform = next(c for c in load_manifest(EVAL / "manifest.jsonl") if c.id == LONGFORM_ID)
    assembled, assembled_text = assemble(args.out, args.seconds)
    files = {"longform-106s": Path(longform.path), assembled.stem: assembled}
    references = {"longform-106s": longform.text, assembled.stem: assembled_text}
    durations = {n: len(decode_audio(f.read_bytes())) / SAMPLE_RATE for n, f in files.items()}
    report: dict = {"model": args.model, "durations_s": durations, "systems": {}}

    for variant in args.variants:
        label = f"ours-{variant}"
        env = {"BENTOWHISPER_MODEL": args.model, **VARIANTS[variant]}
        server = start_server(log_dir=args.out / "tmp" / label, env=env)
        try:
            server.wait_ready()
            report["systems"][label] = asyncio.run(
                measure_ours(server.base_url, files, args.out, label)
            )
        finally:
            server.stop()

    if args.peer:
        peer_out = args.out / "fw-longform.json"
        subprocess.run(
            [str(PEER_PY), "benchmarks/peer/fw_longform.py", "--model", args.model,
             "--concurrent", str(CONCURRENT), "--files", *map(str, files.values()),
             "--out", str(peer_out)],
            check=True, cwd=REPO,
        )  # fmt: skip
        peer = json.loads(peer_out.read_text())
        for mode, run in peer["modes"].items():
            by_name = {n: run["files"][str(f)] for n, f in files.items()}
            report["systems"][f"faster-whisper-{mode}"] = {
                "files": by_name,
                "concurrent_s": run["concurrent_s"],
            }

    table = summarise(report, references, durations)
    (args.out / "longform.json").write_text(json.dumps(report, indent=2))
    (args.out / "longform.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
