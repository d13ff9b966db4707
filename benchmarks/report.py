"""Markdown tables from the JSON that ``benchmarks/compare.py`` wrote (docs/results by default).

.venv/bin/python benchmarks/report.py [--results docs/results] > /tmp/section.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compare import FW_COMPUTE_TYPES, VARIANTS
from evaluate import DEFAULT_MANIFEST, load_manifest, score_clip

ENGLISH_DEV = ("en_ljspeech", "en_librispeech", "en_misc", "fleurs_en")
LANGUAGES = ("en", "de", "fr", "es", "pt", "zh")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _rate(errors: int, units: int) -> str:
    return f"{100 * errors / units:.1f} %" if units else "-"


def english_dev(report: dict) -> tuple[int, int]:
    clips = [c for c in report["clips"] if c.get("group") in ENGLISH_DEV and "errors" in c]
    return sum(c["errors"] for c in clips), sum(c["ref_units"] for c in clips)


def by_language(report: dict, language: str) -> tuple[int, int]:
    clips = [c for c in report["clips"] if c.get("language") == language and "errors" in c]
    return sum(c["errors"] for c in clips), sum(c["ref_units"] for c in clips)


def wer_table(results: Path, systems: list[str]) -> list[str]:
    head = "| system | English dev | " + " | ".join(LANGUAGES) + " |"
    lines = [head, "|---" * (len(LANGUAGES) + 2) + "|"]
    for system in systems:
        report = _load(results / f"wer-{system}.json")
        if report is None:
            continue
        cells = [_rate(*english_dev(report))]
        cells += [_rate(*by_language(report, language)) for language in LANGUAGES]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return lines


def load_table(results: Path, systems: list[str]) -> list[str]:
    lines = [
        "| system | clients | ok / sent | audio s per s | x vs 1 client | p50 s | p95 s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system in systems:
        report = _load(results / f"load-{system}.json")
        if report is None:
            continue
        single = report["levels"][0]["throughput_audio_s_per_s"]
        for level in report["levels"]:
            latency = level["latency_s"]
            lines.append(
                f"| {system} | {level['concurrency']} | {level['ok']} / {level['requests']} | "
                f"{level['throughput_audio_s_per_s']:.2f} | "
                f"{level['throughput_audio_s_per_s'] / single:.2f} | "
                f"{latency['p50']:.2f} | {latency['p95']:.2f} |"
            )
    return lines


def inprocess_table(results: Path, models: list[str]) -> list[str]:
    """faster-whisper in-process: int8 (the peer's setting) and, where run, float32."""
    lines = [
        "| faster-whisper in-process | clips | audio s | wall s | audio s per s | English dev WER |"
    ]
    lines.append("|---|---:|---:|---:|---:|---:|")
    manifest = {clip.id: clip for clip in load_manifest(DEFAULT_MANIFEST)}
    for model in models:
        for compute_type, suffix in FW_COMPUTE_TYPES:
            report = _load(results / f"fw-inprocess-{model}{suffix}.json")
            if report is None:
                continue
            scored = [score_clip(manifest[row["id"]], row["hypothesis"]) for row in report["clips"]]
            wer = _rate(sum(s["errors"] for s in scored), sum(s["ref_units"] for s in scored))
            lines.append(
                f"| {model} ({compute_type}, greedy, 2 threads) | {report['clips_n']} | "
                f"{report['total_audio_s']:.1f} | {report['total_wall_s']:.1f} | "
                f"{report['throughput_audio_s_per_wall_s']:.2f} | {wer} |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("docs/results"))
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    args = parser.parse_args()
    systems = [
        system
        for model in args.models
        for system in (
            *(f"ours-{model}-{variant}" for variant in VARIANTS),
            f"peer-{model}",
        )
    ]
    out = ["### Word error rate", "", *wer_table(args.results, systems), ""]
    out += ["### Throughput and latency (English dev clips)", ""]
    out += load_table(args.results, systems)
    out += ["", *inprocess_table(args.results, args.models), ""]
    hol = _load(args.results / "hol-ours-base.json")
    if hol:
        out += [
            "### Head-of-line (ours, base)",
            "",
            "| | n | p50 s | p95 s |",
            "|---|---:|---:|---:|",
            f"| short (jfk) at idle | {hol['idle']['n']} | {hol['idle']['p50']:.2f} | "
            f"{hol['idle']['p95']:.2f} |",
            f"| short while the {hol['long']['duration_s']:.0f} s file runs | "
            f"{hol['loaded']['n']} | {hol['loaded']['p50']:.2f} | {hol['loaded']['p95']:.2f} |",
            f"| ratio loaded / idle | | {hol['ratio_p50']:.2f} | {hol['ratio_p95']:.2f} |",
            "",
            f"The long file itself took {hol['long']['latency_s']:.1f} s "
            f"({hol['long']['duration_s'] / hol['long']['latency_s']:.1f}x real time).",
        ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
