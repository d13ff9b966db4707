"""Accuracy of any OpenAI-compatible transcription endpoint on the eval manifest (WER / CER).

Every selected clip of a manifest (``/work/shared/eval/manifest.jsonl`` format: ``id``, ``path``
relative to the manifest's folder, ``language``, ``duration_s``, ``text``, optional ``speakers``
and ``note``) is sent through the ``openai`` SDK to ``--base-url`` with ``--model``; with
``--language-hint`` the manifest language is sent as ``language``, otherwise the endpoint
detects it. Nothing is sent anywhere but ``--base-url``: the HTTP client ignores proxy
environment variables and does not follow redirects, the SDK does not retry
(``max_retries=0``), every request has a timeout, and the run stops by itself after
``--max-seconds`` (clips not started by then are reported as skipped).

Scoring
    Hypothesis and reference are normalised with Whisper's normalisers (package
    ``whisper_normalizer``): ``EnglishTextNormalizer`` for English (case, punctuation, spelled
    and written numbers, British/American spelling, fillers such as "uh"/"mm" removed),
    ``BasicTextNormalizer`` for every other language (case, punctuation and symbols).
    Word error rate (jiwer) for space-delimited languages; character error rate for
    ``zh``/``ja``/``yue``: characters of the basic-normalised text with all whitespace removed.
    Aggregates (per language, per group, overall) are *pooled*: total errors (S + D + I) over
    total reference units, not the mean of per-clip rates. A clip's group is the folder after
    ``audio/`` in its path (``audio/<group>/clip.wav``). Word and character scores are also
    pooled separately (``overall_by_unit``), since mixing the two in one number is only a
    rough "mixed error rate". Failed requests are listed and excluded from the aggregates.

Multi-speaker clips (manifest entries with ``speakers``, e.g. the AMI meeting excerpt)
    The reference is all speakers' texts joined in manifest order, and its WER is reported
    like any other clip. A single-channel transcript has no speaker labels and the speakers
    overlap, so this order-dependent WER is pessimistic; next to it we report each speaker's
    *recall*: that speaker's normalised reference aligned (jiwer, minimum edit distance) on
    its own against the whole normalised hypothesis, recall = hits / speaker's reference
    words. Words must appear in order within a speaker, but the speakers may come in any
    order. The hit count of a minimum-edit alignment is close to, but not always equal to,
    the longest common subsequence. The manifest ``text`` of such clips is not used (for the
    stereo clip it carries "LEFT:"/"RIGHT:" labels that are not speech).

    .venv/bin/python benchmarks/evaluate.py --base-url http://127.0.0.1:3000/v1 \\
        --model whisper-1 --language-hint --out eval.json --markdown eval.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jiwer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

REPO_ROOT = Path(__file__).resolve().parents[1]
# As tests/conftest.py: the shared eval set beside the clone, unless BENTOWHISPER_EVAL_DIR says.
DEFAULT_EVAL_DIR = Path(
    os.environ.get("BENTOWHISPER_EVAL_DIR") or REPO_ROOT.parent / "shared" / "eval"
)
DEFAULT_MANIFEST = DEFAULT_EVAL_DIR / "manifest.jsonl"
# Languages written without spaces between words: scored by character error rate.
CER_LANGUAGES = frozenset({"zh", "ja", "yue"})


# --------------------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class Clip:
    id: str
    path: Path  # absolute
    rel_path: str  # as written in the manifest
    group: str
    language: str
    duration_s: float
    text: str
    speakers: dict[str, str] | None = None
    note: str | None = None


def derive_group(rel_path: str) -> str:
    """``audio/<group>/...`` -> ``<group>``; otherwise the clip's parent folder name."""
    parts = PurePosixPath(rel_path.replace("\\", "/")).parts
    if len(parts) >= 3 and parts[0] == "audio":
        return parts[1]
    if len(parts) >= 2:
        return parts[-2]
    return "ungrouped"


def parse_manifest_line(line: str, base_dir: Path) -> Clip:
    entry = json.loads(line)
    speakers = entry.get("speakers")
    if speakers is not None and not isinstance(speakers, dict):  # a list: label them by index
        speakers = {str(i): text for i, text in enumerate(speakers)}
    return Clip(
        id=str(entry["id"]),
        path=(base_dir / entry["path"]).resolve(),
        rel_path=entry["path"],
        group=derive_group(entry["path"]),
        language=entry["language"],
        duration_s=float(entry["duration_s"]),
        text=entry["text"],
        speakers=speakers,
        note=entry.get("note"),
    )


def load_manifest(path: Path) -> list[Clip]:
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [parse_manifest_line(line, path.parent) for line in lines if line.strip()]


def select_clips(
    clips: Iterable[Clip],
    groups: Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
    max_seconds: float | None = None,
) -> list[Clip]:
    """Clips in manifest order whose group is in ``groups`` and id in ``ids`` (each filter
    only when given) and, with ``max_seconds``, no longer than that."""
    group_set = set(groups) if groups else None
    id_set = set(ids) if ids else None
    return [
        c
        for c in clips
        if (group_set is None or c.group in group_set)
        and (id_set is None or c.id in id_set)
        and (max_seconds is None or c.duration_s <= max_seconds)
    ]


def check_filters(clips: list[Clip], groups: list[str] | None, ids: list[str] | None) -> None:
    """Exit with a helpful message when a requested group or id is not in the manifest."""
    unknown_groups = sorted(set(groups or ()) - {c.group for c in clips})
    unknown_ids = sorted(set(ids or ()) - {c.id for c in clips})
    if unknown_groups or unknown_ids:
        known = sorted({c.group for c in clips})
        sys.exit(
            f"unknown groups {unknown_groups} / ids {unknown_ids} (groups: {', '.join(known)})"
        )


# --------------------------------------------------------------------------------------------
# normalisation and scoring (pure)


@cache
def _english() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


@cache
def _basic() -> BasicTextNormalizer:
    return BasicTextNormalizer()


def normalise(text: str, language: str) -> str:
    """Whisper's English normaliser for ``en``, its basic one otherwise; spaces collapsed."""
    normaliser = _english() if language.split("-")[0].lower() == "en" else _basic()
    return " ".join(normaliser(text).split())


def same_language(detected: str, code: str) -> bool:
    """Whether a detected language ("en" or, as OpenAI's verbose_json says, "english") is the
    manifest's ISO-639-1 ``code``; names are looked up in Whisper's table (transformers)."""
    name, code = detected.strip().lower(), code.split("-")[0].lower()
    if name == code:
        return True
    try:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES
    except ImportError:  # pragma: no cover - transformers is a dependency of the project
        return False
    return LANGUAGES.get(code) == name


def unit_for(language: str) -> str:
    return "char" if language.split("-")[0].lower() in CER_LANGUAGES else "word"


def tokens(normalised: str, unit: str) -> list[str]:
    """Scoring units of a normalised text: words, or characters without any whitespace."""
    if unit == "char":
        return list("".join(normalised.split()))
    return normalised.split()


@dataclass(frozen=True)
class Score:
    unit: str  # "word" or "char"
    ref_units: int
    hits: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float | None:
        return self.errors / self.ref_units if self.ref_units else None


def score(reference_norm: str, hypothesis_norm: str, unit: str = "word") -> Score:
    """Edit operations between normalised reference and hypothesis (jiwer), in ``unit``s.
    An empty reference scores every hypothesis unit as an insertion."""
    ref, hyp = tokens(reference_norm, unit), tokens(hypothesis_norm, unit)
    if not ref:
        return Score(unit, 0, 0, 0, 0, len(hyp))
    if not hyp:
        return Score(unit, len(ref), 0, 0, len(ref), 0)
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))  # chars joined by spaces = CER
    return Score(unit, len(ref), out.hits, out.substitutions, out.deletions, out.insertions)


def aggregate(scores: Iterable[Score]) -> dict[str, Any]:
    """Pooled error rate: total errors / total reference units (not a mean of clip rates)."""
    scores = list(scores)
    ref = sum(s.ref_units for s in scores)
    errors = sum(s.errors for s in scores)
    units = {s.unit for s in scores}
    return {
        "clips": len(scores),
        "unit": units.pop() if len(units) == 1 else ("mixed" if units else None),
        "ref_units": ref,
        "errors": errors,
        "substitutions": sum(s.substitutions for s in scores),
        "deletions": sum(s.deletions for s in scores),
        "insertions": sum(s.insertions for s in scores),
        "rate": errors / ref if ref else None,
    }


def multi_speaker_reference(speakers: dict[str, str]) -> str:
    """The reference of a multi-speaker clip: all speakers' texts joined in manifest order."""
    return " ".join(speakers.values())


def speaker_recall(
    speakers: dict[str, str], hypothesis: str, language: str
) -> dict[str, dict[str, Any]]:
    """Per speaker: hits of its own normalised reference aligned against the whole normalised
    hypothesis, over its reference words (see the module docstring)."""
    unit = unit_for(language)
    hyp_norm = normalise(hypothesis, language)
    out = {}
    for name, text in speakers.items():
        s = score(normalise(text, language), hyp_norm, unit)
        out[name] = {
            "ref_units": s.ref_units,
            "hits": s.hits,
            "recall": s.hits / s.ref_units if s.ref_units else None,
        }
    return out


def score_clip(clip: Clip, hypothesis: str) -> dict[str, Any]:
    """Normalised texts, edit counts and rate of one clip (plus per-speaker recall)."""
    unit = unit_for(clip.language)
    reference = multi_speaker_reference(clip.speakers) if clip.speakers else clip.text
    ref_norm = normalise(reference, clip.language)
    hyp_norm = normalise(hypothesis, clip.language)
    s = score(ref_norm, hyp_norm, unit)
    row: dict[str, Any] = {
        "unit": unit,
        "reference_norm": ref_norm,
        "hypothesis_norm": hyp_norm,
        "ref_units": s.ref_units,
        "hits": s.hits,
        "substitutions": s.substitutions,
        "deletions": s.deletions,
        "insertions": s.insertions,
        "errors": s.errors,
        "rate": s.rate,
    }
    if clip.speakers:
        row["speaker_recall"] = speaker_recall(clip.speakers, hypothesis, clip.language)
    return row


def row_score(row: dict[str, Any]) -> Score:
    return Score(
        row["unit"],
        row["ref_units"],
        row["hits"],
        row["substitutions"],
        row["deletions"],
        row["insertions"],
    )


def aggregate_by(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Pooled aggregates of the scored rows, by ``row[key]`` (in first-seen order)."""
    buckets: dict[str, list[Score]] = {}
    for row in rows:
        if row.get("status") == "ok":
            buckets.setdefault(row[key], []).append(row_score(row))
    return {name: aggregate(scores) for name, scores in buckets.items()}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r.get("status") == "ok"]
    return {
        "by_language": aggregate_by(rows, "language"),
        "by_group": aggregate_by(rows, "group"),
        "overall": aggregate(row_score(r) for r in ok),
        "overall_by_unit": aggregate_by(rows, "unit"),
        "clips_ok": len(ok),
        "clips_failed": sum(r.get("status") == "error" for r in rows),
        "clips_skipped": sum(r.get("status") == "skipped" for r in rows),
        "audio_s": round(sum(r["duration_s"] for r in ok), 3),
        "sum_latency_s": round(sum(r["latency_s"] for r in ok), 3),
    }


# --------------------------------------------------------------------------------------------
# the client (shared by load.py and hol.py)


def check_base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"--base-url must be an http(s) URL with a host, not {base_url!r}")
    return base_url.rstrip("/")


def make_client(base_url: str, api_key: str, timeout: float, *, asynchronous: bool = False):
    """An ``openai`` client that only talks to ``base_url``: no retries, no redirects, no
    proxies from the environment, ``timeout`` seconds per request unless a call says less."""
    import openai

    http_kwargs = {"trust_env": False, "follow_redirects": False, "timeout": timeout}
    if asynchronous:
        return openai.AsyncOpenAI(
            base_url=check_base_url(base_url),
            api_key=api_key,
            max_retries=0,
            timeout=timeout,
            http_client=openai.DefaultAsyncHttpxClient(**http_kwargs),
        )
    return openai.OpenAI(
        base_url=check_base_url(base_url),
        api_key=api_key,
        max_retries=0,
        timeout=timeout,
        http_client=openai.DefaultHttpxClient(**http_kwargs),
    )


def transcription_kwargs(
    model: str, name: str, audio: bytes, language: str | None, response_format: str
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": model,
        "file": (name, audio),
        "response_format": response_format,
    }
    if language:
        kwargs["language"] = language
    return kwargs


def response_text(response: Any) -> tuple[str, str | None]:
    """(text, detected language if the format reports one) of any transcription response."""
    if isinstance(response, str):
        return response.strip(), None
    return (getattr(response, "text", "") or "").strip(), getattr(response, "language", None)


def classify_error(exc: BaseException) -> str:
    """HTTP status code as a string, "timeout", "connection", or the exception's type name."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code)
    if isinstance(exc, openai.APITimeoutError):  # a subclass of APIConnectionError
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return type(exc).__name__


# --------------------------------------------------------------------------------------------
# running


@dataclass
class EvalSettings:
    base_url: str
    model: str
    api_key: str = "none"
    language_hint: bool = False
    response_format: str = "json"
    concurrency: int = 1
    timeout_s: float = 300.0
    max_seconds: float = 3600.0
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate(
    clips: list[Clip], settings: EvalSettings, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Transcribe ``clips`` (``settings.concurrency`` at a time) and score them."""
    client = make_client(settings.base_url, settings.api_key, settings.timeout_s)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    start = time.monotonic()
    deadline = start + settings.max_seconds
    lock = threading.Lock()
    done = [0]

    def run_one(clip: Clip) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": clip.id,
            "group": clip.group,
            "language": clip.language,
            "duration_s": clip.duration_s,
            "path": clip.rel_path,
        }
        remaining = deadline - time.monotonic()
        if remaining <= 1.0:
            row.update(status="skipped", error="--max-seconds reached", latency_s=None)
            return row
        kwargs = transcription_kwargs(
            settings.model,
            clip.path.name,
            clip.path.read_bytes(),
            clip.language if settings.language_hint else None,
            settings.response_format,
        )
        t0 = time.perf_counter()
        try:
            response = client.audio.transcriptions.create(
                **kwargs, timeout=min(settings.timeout_s, remaining)
            )
        except Exception as exc:
            row.update(
                status="error",
                error=classify_error(exc),
                detail=str(exc)[:300],
                latency_s=round(time.perf_counter() - t0, 4),
            )
        else:
            latency = time.perf_counter() - t0
            text, detected = response_text(response)
            row.update(status="ok", latency_s=round(latency, 4), hypothesis=text)
            if detected:
                row["detected_language"] = detected
                row["detected_language_matches"] = same_language(detected, clip.language)
            row.update(score_clip(clip, text))
        with lock:
            done[0] += 1
            rate = row.get("rate")
            metric = "CER" if row.get("unit") == "char" else "WER"
            shown = f"{metric} {rate:.1%}" if rate is not None else row["status"]
            shown += f" ({row['error']})" if row.get("error") else ""
            latency = row.get("latency_s")
            took = f"{latency:.2f}s" if latency is not None else "-"
            log(f"[{done[0]}/{len(clips)}] {clip.id}: {shown}, {took}")
        return row

    try:
        with ThreadPoolExecutor(max_workers=max(1, settings.concurrency)) as pool:
            rows = list(pool.map(run_one, clips))
    finally:
        client.close()
    total = time.monotonic() - start
    settings_out = asdict(settings)
    settings_out.pop("api_key")
    return {
        "tool": "benchmarks/evaluate.py",
        "started_at": started_at,
        "settings": settings_out,
        "total_wall_s": round(total, 3),
        **summarise(rows),
        "clips": rows,
    }


# --------------------------------------------------------------------------------------------
# reporting


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _agg_table(title: str, aggs: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| | clips | unit | ref units | errors (S/D/I) | rate |",
        "|---|---:|---|---:|---|---:|",
    ]
    for name, a in aggs.items():
        sdi = f"{a['errors']} ({a['substitutions']}/{a['deletions']}/{a['insertions']})"
        lines.append(
            f"| {name} | {a['clips']} | {a['unit'] or '-'} | {a['ref_units']} | {sdi} | "
            f"{_pct(a['rate'])} |"
        )
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"## Accuracy: `{s['model']}` at {s['base_url']}",
        "",
        f"language hint: {'manifest language' if s['language_hint'] else 'none (detect)'}; "
        f"clips ok {report['clips_ok']}, failed {report['clips_failed']}, skipped "
        f"{report['clips_skipped']}; audio {report['audio_s']:.1f} s; wall "
        f"{report['total_wall_s']:.1f} s (concurrency {s['concurrency']}); sum of request "
        f"latencies {report['sum_latency_s']:.1f} s. Rates are pooled (total errors / total "
        "reference units); WER for words, CER for characters (zh).",
        "",
        "### Per clip",
        "",
        "| id | group | lang | audio s | unit | rate | errors/ref | latency s | note |",
        "|---|---|---|---:|---|---:|---:|---:|---|",
    ]
    for r in report["clips"]:
        if r["status"] == "ok":
            note = ""
            if "speaker_recall" in r:
                note = "recall " + ", ".join(
                    f"{k}: {_pct(v['recall'])}" for k, v in r["speaker_recall"].items()
                )
            if r.get("detected_language") and not r.get("detected_language_matches"):
                note = f"detected {r['detected_language']}; {note}".rstrip("; ")
            lines.append(
                f"| {r['id']} | {r['group']} | {r['language']} | {r['duration_s']:.1f} | "
                f"{r['unit']} | {_pct(r['rate'])} | {r['errors']}/{r['ref_units']} | "
                f"{r['latency_s']:.2f} | {note} |"
            )
        else:
            latency = f"{r['latency_s']:.2f}" if r.get("latency_s") is not None else "-"
            lines.append(
                f"| {r['id']} | {r['group']} | {r['language']} | {r['duration_s']:.1f} | | "
                f"**{r['status']}** | | {latency} | {r.get('error', '')} |"
            )
    lines.append("")
    lines += _agg_table("Per language", report["by_language"])
    lines += _agg_table("Per group", report["by_group"])
    lines += _agg_table(
        "Overall",
        {"all (pooled)": report["overall"]}
        | {f"unit={k}": v for k, v in report["overall_by_unit"].items()},
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_endpoint_args(p)
    add_manifest_args(p)
    p.add_argument("--limit", type=int, help="only the first N selected clips")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1)")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop after (default 3600)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--markdown", type=Path, help="write the markdown report here")
    return p


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:3000/v1")
    p.add_argument("--model", required=True, help="model name sent with each request")
    p.add_argument("--api-key", default="none", help='bearer token (default "none")')
    p.add_argument(
        "--language-hint", action="store_true", help="send the manifest language (else detect)"
    )
    p.add_argument(
        "--response-format",
        default="json",
        choices=["json", "verbose_json", "text"],
        help="json (default, widest support); verbose_json also reports the detected language",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")


def add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--groups", nargs="+", help="only these groups (audio/<group>/...)")
    p.add_argument("--ids", nargs="+", help="only these clip ids")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    all_clips = load_manifest(args.manifest)
    check_filters(all_clips, args.groups, args.ids)
    clips = select_clips(all_clips, args.groups, args.ids)[: args.limit]
    if not clips:
        sys.exit("no clips selected")
    settings = EvalSettings(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key,
        language_hint=args.language_hint,
        response_format=args.response_format,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        max_seconds=args.max_seconds,
        extra={"manifest": str(args.manifest), "groups": args.groups, "ids": args.ids},
    )
    print(f"{len(clips)} clips -> {settings.base_url} ({settings.model})", file=sys.stderr)
    report = evaluate(clips, settings, log=lambda m: print(m, file=sys.stderr))
    markdown = render_markdown(report)
    print(markdown)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown + "\n")
    return 1 if report["clips_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
