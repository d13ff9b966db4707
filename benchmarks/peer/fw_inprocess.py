"""faster-whisper in-process (no server) over an eval manifest: the peer's floor on this machine.

Loads one local CTranslate2 Whisper model (``benchmarks/peer/models/<name>``, made by
``benchmarks/peer/setup.sh``) with faster-whisper at its fastest CPU settings (int8,
``cpu_threads=2``, greedy ``beam_size=1``, no VAD; every other decoding option is
faster-whisper's default, exactly as the peer server runs it) and transcribes the selected
clips one after another. Reports total audio seconds, wall seconds, throughput (audio s per
wall s), per-clip times (audio decoding and transcription separately) and the hypotheses, as
JSON. A warm-up transcription (the first 5 s of the first clip) runs first and is not timed;
model load time is reported on its own.

Manifest: ``/work/shared/eval/manifest.jsonl`` format, selected with ``--groups`` / ``--ids``
like ``benchmarks/evaluate.py`` (whose loader cannot be imported here: it needs jiwer and
whisper_normalizer, which the peer venv does not have; the few lines below mirror it). No
scoring: feed the hypotheses to the project's tools if WER is wanted.

Run it with the PEER venv's python:

    benchmarks/peer/.venv/bin/python benchmarks/peer/fw_inprocess.py --model tiny.en \\
        --ids jfk LJ001-0001 --out /tmp/fw.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_EVAL_DIR = Path(
    os.environ.get("BENTOWHISPER_EVAL_DIR") or REPO_ROOT.parent / "shared" / "eval"
)


def derive_group(rel_path: str) -> str:
    """As evaluate.py: ``audio/<group>/...`` -> ``<group>``; else the parent folder's name."""
    parts = PurePosixPath(rel_path.replace("\\", "/")).parts
    if len(parts) >= 3 and parts[0] == "audio":
        return parts[1]
    if len(parts) >= 2:
        return parts[-2]
    return "ungrouped"


def load_manifest(path: Path) -> list[dict]:
    clips = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        clips.append(
            {
                "id": str(entry["id"]),
                "path": str((path.parent / entry["path"]).resolve()),
                "rel_path": entry["path"],
                "group": derive_group(entry["path"]),
                "language": entry["language"],
                "duration_s": float(entry["duration_s"]),
            }
        )
    return clips


def select(clips: list[dict], groups: list[str] | None, ids: list[str] | None) -> list[dict]:
    unknown_groups = sorted(set(groups or ()) - {c["group"] for c in clips})
    unknown_ids = sorted(set(ids or ()) - {c["id"] for c in clips})
    if unknown_groups or unknown_ids:
        known = sorted({c["group"] for c in clips})
        sys.exit(
            f"unknown groups {unknown_groups} / ids {unknown_ids} (groups: {', '.join(known)})"
        )
    return [
        c for c in clips if (not groups or c["group"] in groups) and (not ids or c["id"] in ids)
    ]


def resolve_model(name: str) -> Path:
    for candidate in (HERE / "models" / name, Path(name)):
        if (candidate / "model.bin").exists() and (candidate / "tokenizer.json").exists():
            return candidate.resolve()
    sys.exit(f"no CTranslate2 model directory {HERE / 'models' / name} or {name}: run setup.sh")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model", default="tiny.en", help="tiny.en | base | a CT2 model dir")
    p.add_argument("--manifest", type=Path, default=DEFAULT_EVAL_DIR / "manifest.jsonl")
    p.add_argument("--groups", nargs="+", help="only these groups (audio/<group>/...)")
    p.add_argument("--ids", nargs="+", help="only these clip ids")
    p.add_argument("--limit", type=int, help="only the first N selected clips")
    p.add_argument(
        "--language-hint", action="store_true", help="pass the manifest language (else detect)"
    )
    p.add_argument("--cpu-threads", type=int, default=2)
    p.add_argument("--compute-type", default="int8")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--vad", action="store_true", help="Silero VAD filter (off by default)")
    p.add_argument("--repeat", type=int, default=1, help="transcribe each clip N times")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    p.add_argument("--out", type=Path, help="write the JSON report here (else to stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Offline, and no thread pool larger than asked (set before faster_whisper is imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.cpu_threads)

    import ctranslate2
    import faster_whisper
    from faster_whisper import WhisperModel
    from faster_whisper.audio import decode_audio

    manifest = args.manifest.resolve()
    clips = select(load_manifest(manifest), args.groups, args.ids)[: args.limit] * args.repeat
    if not clips:
        sys.exit("no clips selected")
    model_dir = resolve_model(args.model)

    t = time.perf_counter()
    model = WhisperModel(
        str(model_dir),
        device="cpu",
        compute_type=args.compute_type,
        cpu_threads=args.cpu_threads,
        num_workers=1,
    )
    load_s = time.perf_counter() - t
    sr = model.feature_extractor.sampling_rate
    options = {"beam_size": args.beam_size, "vad_filter": args.vad}

    warmup_s = None
    if not args.no_warmup:
        t = time.perf_counter()
        # The first 5 s of the first clip (silence would make Whisper loop through its
        # temperature fallbacks and take longer than real speech).
        first = decode_audio(clips[0]["path"], sampling_rate=sr)[: 5 * sr]
        segments, _ = model.transcribe(first, **options)
        list(segments)
        warmup_s = time.perf_counter() - t
    print(
        f"{len(clips)} clips, model {model_dir} loaded in {load_s:.2f}s"
        + (f", warm-up {warmup_s:.2f}s" if warmup_s is not None else ""),
        file=sys.stderr,
    )

    rows = []
    run_start = time.perf_counter()
    for i, clip in enumerate(clips, 1):
        t0 = time.perf_counter()
        audio = decode_audio(clip["path"], sampling_rate=sr)
        t1 = time.perf_counter()
        language = clip["language"] if args.language_hint else None
        segments, info = model.transcribe(audio, language=language, **options)
        segments = list(segments)  # the generator does the decoding work
        t2 = time.perf_counter()
        text = "".join(s.text for s in segments).strip()
        row = {
            "id": clip["id"],
            "group": clip["group"],
            "language": clip["language"],
            "path": clip["rel_path"],
            "duration_s": clip["duration_s"],
            "decoded_duration_s": round(len(audio) / sr, 3),
            "audio_decode_s": round(t1 - t0, 4),
            "transcribe_s": round(t2 - t1, 4),
            "wall_s": round(t2 - t0, 4),
            "rtf": round((t2 - t0) / clip["duration_s"], 4) if clip["duration_s"] else None,
            "detected_language": info.language,
            "language_probability": round(info.language_probability, 4),
            "segments": len(segments),
            "hypothesis": text,
        }
        rows.append(row)
        print(
            f"[{i}/{len(clips)}] {clip['id']}: {row['wall_s']:.2f}s for "
            f"{clip['duration_s']:.1f}s audio ({info.language}) {text[:70]!r}",
            file=sys.stderr,
        )
    wall = time.perf_counter() - run_start
    audio_s = sum(r["duration_s"] for r in rows)

    report = {
        "tool": "benchmarks/peer/fw_inprocess.py",
        "engine": {
            "faster_whisper": faster_whisper.__version__,
            "ctranslate2": ctranslate2.__version__,
        },
        "settings": {
            "model": args.model,
            "model_dir": str(model_dir),
            "device": "cpu",
            "compute_type": args.compute_type,
            "cpu_threads": args.cpu_threads,
            "num_workers": 1,
            "beam_size": args.beam_size,
            "vad_filter": args.vad,
            "language_hint": args.language_hint,
            "manifest": str(manifest),
            "groups": args.groups,
            "ids": args.ids,
            "limit": args.limit,
        },
        "model_load_s": round(load_s, 3),
        "warmup_s": round(warmup_s, 3) if warmup_s is not None else None,
        "clips_n": len(rows),
        "total_audio_s": round(audio_s, 3),
        "total_wall_s": round(wall, 3),
        "sum_clip_wall_s": round(sum(r["wall_s"] for r in rows), 3),
        "throughput_audio_s_per_wall_s": round(audio_s / wall, 3) if wall else None,
        "rtf": round(wall / audio_s, 4) if audio_s else None,
        "clips": rows,
    }
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    print(
        f"audio {audio_s:.1f}s, wall {wall:.2f}s, throughput "
        f"{report['throughput_audio_s_per_wall_s']}x realtime",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
