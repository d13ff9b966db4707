"""Head-of-line blocking: how much one long transcription slows short ones behind it.

0. warm-up: ``--warmup`` short requests, one after another, not counted.
1. idle: ``--short-clients`` clients (default 2) send the short clip (``--short PATH``, or the
   manifest clip ``--short-id``, default ``jfk``) back to back until ``--short-requests``
   (default 20) have answered. The idle phase uses the same number of clients as the loaded
   phase, so the only difference between the two is the long request; ``--short-clients 1``
   makes both phases sequential.
2. loaded: ONE long request (``--long PATH``, or ``--make-long SECONDS``: English manifest
   clips concatenated with the FFmpeg of ``imageio_ffmpeg`` into a temporary FLAC, deleted
   afterwards) is started; ``--head-start`` seconds later the same short clients send the short
   clip back to back for as long as the long request is in flight (at most
   ``--max-loaded-requests``). Every short request counted as loaded was *started* while the
   long one was running.

Reported (JSON with ``--out``): idle and loaded latency p50/p95 (successful requests, linear
interpolation), the ratios loaded/idle of p50 and p95, the long request's own latency, and
errors. Short requests time out after ``--timeout``; the long one is bounded only by what is
left of ``--max-seconds``, by which everything stops. No retries; only ``--base-url`` is
contacted.

    .venv/bin/python benchmarks/hol.py --base-url http://127.0.0.1:3000/v1 --model whisper-1 \\
        --make-long 600 --out hol.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evaluate import (
    DEFAULT_MANIFEST,
    Clip,
    classify_error,
    load_manifest,
    make_client,
    response_text,
    transcription_kwargs,
)
from load import latency_summary

# --------------------------------------------------------------------------------------------
# pure helpers


def parse_ffmpeg_duration(stderr: str) -> float | None:
    """Seconds from the ``Duration: HH:MM:SS.ss`` line that ``ffmpeg -i FILE`` prints."""
    match = re.search(r"Duration:\s*(\d+):(\d{2}):(\d{2}(?:\.\d+)?)", stderr)
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def plan_concat(durations: Sequence[float], seconds: float) -> list[int]:
    """Indexes into ``durations``, cycling in order, until their total reaches ``seconds``."""
    if seconds <= 0:
        return []
    if not durations or all(d <= 0 for d in durations):
        raise ValueError("need clips with a positive duration")
    plan: list[int] = []
    total = 0.0
    while total < seconds:
        i = len(plan) % len(durations)
        plan.append(i)
        total += max(durations[i], 0.0)
    return plan


def concat_command(ffmpeg: str, inputs: Sequence[Path], seconds: float, out: Path) -> list[str]:
    """FFmpeg arguments: decode every input to 16 kHz mono, concatenate, cut at ``seconds``,
    write FLAC."""
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    for path in inputs:
        cmd += ["-i", str(path)]
    chains = "".join(
        f"[{i}:a]aresample=16000,aformat=sample_fmts=s16:channel_layouts=mono[a{i}];"
        for i in range(len(inputs))
    )
    joined = "".join(f"[a{i}]" for i in range(len(inputs)))
    graph = f"{chains}{joined}concat=n={len(inputs)}:v=0:a=1[out]"
    return [*cmd, "-filter_complex", graph, "-map", "[out]", "-t", f"{seconds:.3f}", str(out)]


def ratio(loaded: float | None, idle: float | None) -> float | None:
    return round(loaded / idle, 3) if loaded is not None and idle else None


# --------------------------------------------------------------------------------------------
# audio files


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def probe_duration(path: Path) -> float | None:
    proc = subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return parse_ffmpeg_duration(proc.stderr)


def make_long(clips: Sequence[Clip], seconds: float, out_dir: Path) -> Path:
    plan = plan_concat([c.duration_s for c in clips], seconds)
    out = out_dir / f"long_{int(seconds)}s.flac"
    cmd = concat_command(ffmpeg_exe(), [clips[i].path for i in plan], seconds, out)
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    return out


# --------------------------------------------------------------------------------------------
# running


@dataclass
class Shot:
    start_s: float  # since the phase started
    latency_s: float
    outcome: str


@dataclass
class HolSettings:
    base_url: str
    model: str
    api_key: str = "none"
    language: str | None = None
    response_format: str = "json"
    timeout_s: float = 300.0
    short_clients: int = 2
    long_clients: int = 1
    short_requests: int = 20
    warmup: int = 0
    max_loaded_requests: int = 200
    head_start_s: float = 1.0
    max_seconds: float = 900.0


async def transcribe(
    client: Any, s: HolSettings, name: str, audio: bytes, timeout: float
) -> tuple[str, float]:
    kwargs = transcription_kwargs(s.model, name, audio, s.language, s.response_format)
    t0 = time.monotonic()
    try:
        response = await client.audio.transcriptions.create(**kwargs, timeout=max(timeout, 0.1))
    except Exception as exc:
        return classify_error(exc), time.monotonic() - t0
    response_text(response)
    return "ok", time.monotonic() - t0


def phase_summary(shots: Sequence[Shot]) -> dict[str, Any]:
    ok = [x.latency_s for x in shots if x.outcome == "ok"]
    errors = Counter(x.outcome for x in shots if x.outcome != "ok")
    return {**latency_summary(ok), "requests": len(shots), "errors": dict(sorted(errors.items()))}


async def run(s: HolSettings, short: tuple[str, bytes], long: tuple[str, bytes], log=print):
    client = make_client(s.base_url, s.api_key, s.timeout_s, asynchronous=True)
    start = time.monotonic()
    deadline = start + s.max_seconds

    def remaining() -> float:
        return min(s.timeout_s, deadline - time.monotonic())

    try:
        # warm-up: not counted (a fresh server's first requests fall into BentoML's calibration)
        for _ in range(s.warmup):
            await transcribe(client, s, *short, remaining())

        # idle
        idle: list[Shot] = []
        idle_start = time.monotonic()
        issued = iter(range(s.short_requests))

        async def idle_client() -> None:
            while next(issued, None) is not None and remaining() > 1.0:
                t0 = time.monotonic() - idle_start
                outcome, latency = await transcribe(client, s, *short, remaining())
                idle.append(Shot(t0, latency, outcome))

        await asyncio.gather(*(idle_client() for _ in range(s.short_clients)))
        log(f"idle: {phase_summary(idle)}")

        # loaded
        loaded: list[Shot] = []
        loaded_start = time.monotonic()
        # The long request may take longer than --timeout: only --max-seconds bounds it.
        long_timeout = deadline - time.monotonic()
        long_tasks = [
            asyncio.create_task(transcribe(client, s, *long, long_timeout))
            for _ in range(s.long_clients)
        ]
        await asyncio.wait(long_tasks, timeout=s.head_start_s)
        count = iter(range(s.max_loaded_requests))

        def long_running() -> bool:  # short requests count as loaded while every long one runs
            return not any(task.done() for task in long_tasks)

        async def loaded_client() -> None:
            while long_running() and remaining() > 1.0 and next(count, None) is not None:
                t0 = time.monotonic() - loaded_start
                outcome, latency = await transcribe(client, s, *short, remaining())
                loaded.append(Shot(t0, latency, outcome))

        await asyncio.gather(*(loaded_client() for _ in range(s.short_clients)))
        finished = await asyncio.gather(*long_tasks)
        failed = [outcome for outcome, _ in finished if outcome != "ok"]
        long_outcome = failed[0] if failed else "ok"
        long_latency = max(latency for _, latency in finished)
        log(f"loaded: {phase_summary(loaded)}; long: {long_outcome} in {long_latency:.2f}s")
    finally:
        await client.close()
    return idle, loaded, (long_outcome, long_latency)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:3000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default="none")
    p.add_argument("--language", help="send this language with every request (else detect)")
    p.add_argument("--response-format", default="json", choices=["json", "verbose_json", "text"])
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    short = p.add_mutually_exclusive_group()
    short.add_argument("--short", type=Path, help="the short clip (default: --short-id)")
    short.add_argument("--short-id", default="jfk", help="manifest id of the short clip")
    long = p.add_mutually_exclusive_group(required=True)
    long.add_argument("--long", type=Path, help="the long audio file")
    long.add_argument("--make-long", type=float, metavar="SECONDS", help="build one this long")
    p.add_argument(
        "--make-long-groups",
        nargs="+",
        default=["en_ljspeech", "en_librispeech", "fleurs_en"],
        help="manifest groups concatenated by --make-long",
    )
    p.add_argument("--short-clients", type=int, default=2, help="concurrent short clients")
    p.add_argument("--long-clients", type=int, default=1, help="long requests at once")
    p.add_argument("--short-requests", type=int, default=20, help="short requests when idle")
    p.add_argument("--warmup", type=int, default=0, help="short requests first, not counted")
    p.add_argument("--max-loaded-requests", type=int, default=200)
    p.add_argument("--head-start", type=float, default=1.0, help="seconds before short ones")
    p.add_argument("--max-seconds", type=float, default=900.0, help="hard limit (default 900)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.short_clients < 1 or args.short_requests < 1:
        sys.exit("--short-clients and --short-requests must be >= 1")

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    clips = load_manifest(args.manifest) if args.manifest.exists() else []
    if args.short:
        short_path, short_duration = args.short, probe_duration(args.short)
    else:
        match = [c for c in clips if c.id == args.short_id]
        if not match:
            sys.exit(f"no clip {args.short_id!r} in {args.manifest}")
        short_path, short_duration = match[0].path, match[0].duration_s

    tmp_dir = Path(tempfile.mkdtemp(prefix="bentowhisper-hol-"))
    try:
        if args.long:
            long_path, long_duration = args.long, probe_duration(args.long)
        else:
            sources = [c for c in clips if c.group in set(args.make_long_groups)]
            if not sources:
                sys.exit(f"no manifest clips in groups {args.make_long_groups}")
            long_path = make_long(sources, args.make_long, tmp_dir)
            long_duration = probe_duration(long_path)
            log(f"made {long_path.name}: {long_duration} s, {long_path.stat().st_size} bytes")
        s = HolSettings(
            base_url=args.base_url,
            model=args.model,
            api_key=args.api_key,
            language=args.language,
            response_format=args.response_format,
            timeout_s=args.timeout,
            short_clients=args.short_clients,
            long_clients=args.long_clients,
            short_requests=args.short_requests,
            warmup=args.warmup,
            max_loaded_requests=args.max_loaded_requests,
            head_start_s=args.head_start,
            max_seconds=args.max_seconds,
        )
        started = datetime.now(UTC).isoformat(timespec="seconds")
        idle, loaded, (long_outcome, long_latency) = asyncio.run(
            run(
                s,
                (short_path.name, short_path.read_bytes()),
                (long_path.name, long_path.read_bytes()),
                log,
            )
        )
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    idle_sum, loaded_sum = phase_summary(idle), phase_summary(loaded)
    warnings = []
    if long_outcome != "ok":
        warnings.append(f"the long request failed ({long_outcome}): loaded numbers are suspect")
    if loaded_sum["n"] < 5 and loaded_sum["requests"] < s.max_loaded_requests:
        warnings.append(f"only {loaded_sum['n']} short requests ran under load; use a longer file")
    report = {
        "tool": "benchmarks/hol.py",
        "started_at": started,
        "settings": {k: v for k, v in s.__dict__.items() if k != "api_key"},
        "short": {"path": str(short_path), "duration_s": short_duration},
        "long": {
            "path": str(args.long)
            if args.long
            else f"--make-long {args.make_long} from {' '.join(args.make_long_groups)}",
            "duration_s": long_duration,
            "outcome": long_outcome,
            "latency_s": round(long_latency, 4),
        },
        "idle": idle_sum,
        "loaded": loaded_sum,
        "ratio_p50": ratio(loaded_sum["p50"], idle_sum["p50"]),
        "ratio_p95": ratio(loaded_sum["p95"], idle_sum["p95"]),
        "warnings": warnings,
        "shots": {"idle": [x.__dict__ for x in idle], "loaded": [x.__dict__ for x in loaded]},
    }
    print(json.dumps({k: v for k, v in report.items() if k != "shots"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
