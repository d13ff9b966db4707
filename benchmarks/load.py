"""Load generator for any OpenAI-compatible transcription endpoint: throughput and latency
versus concurrency.

For each ``--concurrency`` level, one after another, N asyncio clients (one shared
``AsyncOpenAI`` client, ``max_retries=0``, a timeout per request) send manifest clips, picked
round-robin across all clients (every level starts again from the first clip), to
``--base-url`` back to back: each client sends its next
request as soon as its previous one has answered (a closed loop), or ``--error-pause``
seconds after a failed one. A level runs for ``--duration`` seconds (no request is started
after that; those in flight are awaited) and/or until ``--requests`` requests have been sent
(at least one of the two is required), and never longer than ``--max-seconds``.

Per level: throughput = audio seconds of the successful requests / wall seconds (from the
level's first request to its last answer, so the tail is counted) and successful requests
per second; latency p50/p95/p99 (successful requests, linear interpolation like
``numpy.percentile``) overall and by clip length (``<5s``, ``5-15s``, ``15-30s``, ``30s+``,
intervals closed below and open above); errors by kind (HTTP status code, ``timeout``,
``connection``). ``--warmup`` requests are sent once before the first level and not counted.
JSON with ``--out``, a PNG of throughput and p95 against concurrency with ``--plot``
(matplotlib, ``pip install -e .[bench]``).

Only ``--base-url`` is contacted (no proxies from the environment, no redirects).

    .venv/bin/python benchmarks/load.py --base-url http://127.0.0.1:3000/v1 --model whisper-1 \\
        --concurrency 1 4 16 --duration 60 --max-clip-seconds 30 --out load.json --plot load.png
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evaluate import (
    Clip,
    add_endpoint_args,
    add_manifest_args,
    check_filters,
    classify_error,
    load_manifest,
    make_client,
    response_text,
    select_clips,
    transcription_kwargs,
)

# (label, lower bound inclusive, upper bound exclusive), seconds of audio
BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<5s", 0.0, 5.0),
    ("5-15s", 5.0, 15.0),
    ("15-30s", 15.0, 30.0),
    ("30s+", 30.0, math.inf),
)


# --------------------------------------------------------------------------------------------
# pure statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, as
    ``numpy.percentile``'s default method; ``None`` for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], not {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def bucket_for(duration_s: float) -> str:
    for label, lo, hi in BUCKETS:
        if lo <= duration_s < hi:
            return label
    raise ValueError(f"no bucket for a duration of {duration_s}")


def latency_summary(values: Sequence[float]) -> dict[str, Any]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "n": len(values),
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
        "p99": r(percentile(values, 99)),
        "mean": r(sum(values) / len(values)) if values else None,
        "min": r(min(values)) if values else None,
        "max": r(max(values)) if values else None,
    }


@dataclass(frozen=True)
class Record:
    clip_id: str
    duration_s: float  # audio
    start_s: float  # since the level started
    latency_s: float
    outcome: str  # "ok" or an error kind: "503", "timeout", "connection", ...


def summarise_level(records: Sequence[Record], wall_s: float, concurrency: int) -> dict[str, Any]:
    """Throughput, latency percentiles (overall and by clip-length bucket) and errors."""
    ok = [r for r in records if r.outcome == "ok"]
    audio_s = sum(r.duration_s for r in ok)
    by_bucket = {
        label: latency_summary([r.latency_s for r in ok if bucket_for(r.duration_s) == label])
        for label, _, _ in BUCKETS
    }
    return {
        "concurrency": concurrency,
        "wall_s": round(wall_s, 3),
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(Counter(r.outcome for r in records if r.outcome != "ok").items())),
        "audio_s": round(audio_s, 3),
        "throughput_audio_s_per_s": round(audio_s / wall_s, 4) if wall_s > 0 else None,
        "throughput_requests_per_s": round(len(ok) / wall_s, 4) if wall_s > 0 else None,
        "latency_s": latency_summary([r.latency_s for r in ok]),
        "latency_by_clip_length_s": {k: v for k, v in by_bucket.items() if v["n"]},
    }


# --------------------------------------------------------------------------------------------
# running


@dataclass
class LoadSettings:
    base_url: str
    model: str
    api_key: str = "none"
    language_hint: bool = False
    response_format: str = "json"
    timeout_s: float = 300.0
    duration_s: float | None = None
    requests: int | None = None
    max_seconds: float = 1800.0
    error_pause_s: float = 0.5


class Workload:
    """The clips with their bytes in memory, handed out round-robin."""

    def __init__(self, clips: Sequence[Clip]) -> None:
        self.clips = list(clips)
        self.audio = {c.id: c.path.read_bytes() for c in self.clips}
        self._next = itertools.count()

    def next_clip(self) -> Clip:
        return self.clips[next(self._next) % len(self.clips)]

    def restart(self) -> None:
        """Start again from the first clip (each level sends the same sequence)."""
        self._next = itertools.count()


async def send(client: Any, s: LoadSettings, clip: Clip, audio: bytes, timeout: float) -> str:
    """One transcription; returns "ok" or the error kind."""
    kwargs = transcription_kwargs(
        s.model,
        clip.path.name,
        audio,
        clip.language if s.language_hint else None,
        s.response_format,
    )
    try:
        response = await client.audio.transcriptions.create(**kwargs, timeout=timeout)
    except Exception as exc:
        return classify_error(exc)
    response_text(response)
    return "ok"


async def run_level(
    client: Any, s: LoadSettings, workload: Workload, concurrency: int
) -> tuple[list[Record], float]:
    start = time.monotonic()
    hard_deadline = start + s.max_seconds
    stop_starting = start + min(s.duration_s or math.inf, s.max_seconds)
    tickets = itertools.count()
    records: list[Record] = []

    async def client_loop() -> None:
        while True:
            now = time.monotonic()
            if now >= stop_starting:
                return
            if s.requests is not None and next(tickets) >= s.requests:
                return
            clip = workload.next_clip()
            timeout = min(s.timeout_s, hard_deadline - now)
            t0 = time.monotonic()
            outcome = await send(client, s, clip, workload.audio[clip.id], timeout)
            t1 = time.monotonic()
            records.append(Record(clip.id, clip.duration_s, t0 - start, t1 - t0, outcome))
            if outcome != "ok":  # do not hammer a server that refuses or sheds load
                await asyncio.sleep(max(0.0, min(s.error_pause_s, stop_starting - t1)))

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return records, time.monotonic() - start


async def run_all(
    s: LoadSettings, workload: Workload, levels: Sequence[int], warmup: int, log=print
) -> dict[str, Any]:
    client = make_client(s.base_url, s.api_key, s.timeout_s, asynchronous=True)
    out: dict[str, Any] = {"warmup": [], "levels": []}
    try:
        for _ in range(warmup):
            clip = workload.next_clip()
            t0 = time.monotonic()
            outcome = await send(client, s, clip, workload.audio[clip.id], s.timeout_s)
            latency = round(time.monotonic() - t0, 4)
            out["warmup"].append({"clip": clip.id, "outcome": outcome, "latency_s": latency})
            log(f"warm-up {clip.id}: {outcome} in {latency:.2f}s")
        for concurrency in levels:
            workload.restart()
            records, wall = await run_level(client, s, workload, concurrency)
            level = summarise_level(records, wall, concurrency)
            level["records"] = [r.__dict__ for r in records]
            out["levels"].append(level)
            lat = level["latency_s"]
            log(
                f"c={concurrency}: {level['ok']}/{level['requests']} ok in {wall:.1f}s, "
                f"{level['throughput_audio_s_per_s']} audio s/s, "
                f"{level['throughput_requests_per_s']} req/s, p50 {lat['p50']} p95 {lat['p95']} "
                f"p99 {lat['p99']} s, errors {level['errors'] or 'none'}"
            )
    finally:
        await client.close()
    return out


def render_table(levels: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the levels: throughput, latency percentiles, p95 by clip length."""

    def f(x: float | None, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    head = [
        "| clients | requests | ok | errors | audio s/s | req/s | p50 s | p95 s | p99 s | "
        + " | ".join(f"p95 {label}" for label, _, _ in BUCKETS)
        + " |",
        "|" + "---:|" * (9 + len(BUCKETS)),
    ]
    rows = []
    for lv in levels:
        lat = lv["latency_s"]
        errors = ", ".join(f"{k}: {v}" for k, v in lv["errors"].items()) or "0"
        buckets = lv["latency_by_clip_length_s"]
        by_len = " | ".join(
            f(buckets[label]["p95"]) if label in buckets else "-" for label, _, _ in BUCKETS
        )
        rows.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['ok']} | {errors} | "
            f"{f(lv['throughput_audio_s_per_s'])} | {f(lv['throughput_requests_per_s'])} | "
            f"{f(lat['p50'])} | {f(lat['p95'])} | {f(lat['p99'])} | {by_len} |"
        )
    return "\n".join(head + rows)


def plot_levels(levels: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Throughput (audio s / s) and p95 latency against concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv["concurrency"] for lv in levels]
    thr = [lv["throughput_audio_s_per_s"] or 0.0 for lv in levels]
    p95 = [lv["latency_s"]["p95"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, thr, marker="o")
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("audio seconds per wall second")
    ax1.set_title("throughput")
    ax2.plot(xs, [float("nan") if v is None else v for v in p95], marker="o", color="C1")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("p95 latency (s)")
    ax2.set_title("p95 latency (successful requests)")
    for ax in (ax1, ax2):
        if len(xs) > 1 and max(xs) / max(min(xs), 1) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_endpoint_args(p)
    add_manifest_args(p)
    p.add_argument("--max-clip-seconds", type=float, help="skip clips longer than this")
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[1], help="levels, e.g. 1 4 16 (default 1)"
    )
    p.add_argument("--duration", type=float, help="seconds per level (start no request after)")
    p.add_argument("--requests", type=int, help="requests per level (at most, with --duration)")
    p.add_argument(
        "--max-seconds", type=float, default=1800.0, help="hard limit per level (default 1800)"
    )
    p.add_argument(
        "--error-pause", type=float, default=0.5, help="a client's pause after an error (0.5 s)"
    )
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests first (default 1)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration is None and args.requests is None:
        sys.exit("give --duration and/or --requests")
    if (args.duration is not None and args.duration <= 0) or (
        args.requests is not None and args.requests <= 0
    ):
        sys.exit("--duration / --requests must be positive")
    if any(c < 1 for c in args.concurrency):
        sys.exit("--concurrency levels must be >= 1")
    all_clips = load_manifest(args.manifest)
    check_filters(all_clips, args.groups, args.ids)
    clips = select_clips(all_clips, args.groups, args.ids, args.max_clip_seconds)
    if not clips:
        sys.exit("no clips selected")
    s = LoadSettings(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key,
        language_hint=args.language_hint,
        response_format=args.response_format,
        timeout_s=args.timeout,
        duration_s=args.duration,
        requests=args.requests,
        max_seconds=args.max_seconds,
        error_pause_s=args.error_pause,
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    log(f"{len(clips)} clips, levels {args.concurrency} -> {s.base_url} ({s.model})")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    result = asyncio.run(run_all(s, Workload(clips), args.concurrency, args.warmup, log))
    settings_out = {k: v for k, v in s.__dict__.items() if k != "api_key"}
    report = {
        "tool": "benchmarks/load.py",
        "started_at": started,
        "settings": {
            **settings_out,
            "levels": args.concurrency,
            "manifest": str(args.manifest),
            "groups": args.groups,
            "ids": args.ids,
            "max_clip_seconds": args.max_clip_seconds,
            "clips": [c.id for c in clips],
        },
        **result,
    }
    print(render_table(report["levels"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_levels(report["levels"], args.plot, f"{s.model} at {s.base_url}")
    return 0 if all(lv["ok"] for lv in report["levels"]) else 1  # 1: a level had no success


if __name__ == "__main__":
    sys.exit(main())
