"""Soak: many clients for a long time against a running server; nothing lost, memory flat.

Clients send the English dev clips round-robin (``benchmarks/load.py``'s machinery) for
``--duration`` seconds while the resident memory of the server's processes (``--pid``: the
``bentoml serve`` process; its workers are found below it) is sampled. Every request must be
answered: 200, or 429/503, which this server always sends with ``Retry-After``; a timeout or a
dropped connection counts as lost. Memory growth is measured from the end of the first quarter
of the run (warm-up) to the end.

    .venv/bin/python benchmarks/soak.py --base-url http://127.0.0.1:3000/v1 --pid PID \\
        --clients 64 --duration 600 --out docs/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from evaluate import DEFAULT_MANIFEST, load_manifest, select_clips
from load import LoadSettings, Workload, run_all

ENGLISH_DEV = ["en_ljspeech", "en_librispeech", "en_misc", "fleurs_en"]
ANSWERED = {"ok", "429", "503"}


def role(cmdline: list[str]) -> str:
    """``--service-name`` of a BentoML worker, ``arbiter`` for ``bentoml serve``, else the exe."""
    if "--service-name" in cmdline[:-1]:
        return cmdline[cmdline.index("--service-name") + 1]
    if "serve" in cmdline:
        return "arbiter"
    return Path(cmdline[0]).name if cmdline else "?"


def tree_rss_bytes(root: int) -> dict[str, int]:
    """Resident memory of ``root`` and every process below it, summed by :func:`role`."""
    import psutil

    try:
        parent = psutil.Process(root)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    by_role: dict[str, int] = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            name = role(process.cmdline())
            by_role[name] = by_role.get(name, 0) + process.memory_info().rss
    return by_role


def growth(samples: list[tuple[float, int]], warmup_s: float) -> dict[str, float | None]:
    """MB after warm-up, at the end, and the relative growth between them."""
    warm = [rss for t, rss in samples if t >= warmup_s] or [rss for _, rss in samples]
    if not warm or not warm[0]:
        return {"after_warmup_mb": None, "end_mb": None, "growth": None}
    return {
        "after_warmup_mb": round(warm[0] / 2**20, 1),
        "end_mb": round(warm[-1] / 2**20, 1),
        "growth": round((warm[-1] - warm[0]) / warm[0], 4),
    }


def soak(base_url: str, pid: int, clients: int, duration_s: float, model: str = "whisper-1"):
    """Run the soak; return its summary (outcomes, memory samples and growth)."""
    clips = select_clips(load_manifest(DEFAULT_MANIFEST), groups=ENGLISH_DEV, ids=None)
    settings = LoadSettings(
        base_url=base_url,
        model=model,
        timeout_s=duration_s + 300.0,
        duration_s=duration_s,
        max_seconds=duration_s + 300.0,
    )
    samples: list[tuple[float, dict[str, int]]] = []
    done = threading.Event()
    start = time.monotonic()

    def sample() -> None:
        while not done.is_set():
            samples.append((round(time.monotonic() - start, 1), tree_rss_bytes(pid)))
            done.wait(2.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = asyncio.run(
            run_all(settings, Workload(clips), [clients], warmup=0, log=lambda *_: None)
        )
    finally:
        done.set()
        sampler.join()
    (level,) = result["levels"]
    outcomes: dict[str, int] = {}
    for record in level["records"]:
        outcomes[record["outcome"]] = outcomes.get(record["outcome"], 0) + 1
    total = [(t, sum(by_role.values())) for t, by_role in samples]
    roles = sorted({name for _, by_role in samples for name in by_role})
    per_role = {
        name: growth([(t, by_role.get(name, 0)) for t, by_role in samples], duration_s / 4)
        for name in roles
    }
    overall = growth(total, duration_s / 4)
    return {
        "clients": clients,
        "duration_s": duration_s,
        "requests": len(level["records"]),
        "outcomes": outcomes,
        "lost": sum(n for kind, n in outcomes.items() if kind not in ANSWERED),
        "throughput_audio_s_per_s": level["throughput_audio_s_per_s"],
        "latency_s": level["latency_s"],
        "rss_after_warmup_mb": overall["after_warmup_mb"],
        "rss_end_mb": overall["end_mb"],
        "rss_peak_mb": round(max(rss for _, rss in total) / 2**20, 1) if total else None,
        "rss_growth_after_warmup": overall["growth"],
        "rss_by_process": per_role,
        "rss_samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:3000/v1")
    parser.add_argument("--pid", type=int, required=True, help="the bentoml serve process")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds")
    parser.add_argument("--model", default="whisper-1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = soak(args.base_url, args.pid, args.clients, args.duration, args.model)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    summary: dict[str, Any] = {k: v for k, v in report.items() if k != "rss_samples"}
    print(json.dumps(summary, indent=1))
    return 0 if report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
