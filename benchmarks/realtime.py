"""Concurrent realtime sessions against a running server: how soon text arrives while people speak.

``--sessions`` clients (the ``openai`` SDK's realtime client) each stream a different English
clip of the eval manifest (LJ Speech, 5-12 s) in 100 ms appends at real time, with server VAD,
all at once. Per session: the first delta's delay after speech starts (the onset is
``audio_start_ms + prefix_padding_ms`` of the first ``speech_started``, on the clock of the
audio sent, which is real time), whether it came before ``speech_stopped``, the ``completed``
transcript's delay after ``speech_stopped``, its word error rate, and whether the deltas end
to end are that transcript (no partial sent words that the full decode revised). From ``/metrics``
(before and after): the model service's batches and how many held more than one item.

    .venv/bin/python benchmarks/realtime.py --url http://127.0.0.1:3000 --sessions 8 --out rt.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import jiwer
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from whisper_normalizer.english import EnglishTextNormalizer

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"
PREFIX_PADDING_MS = 300
RATE = 24000


def clips(count: int) -> list[dict]:
    with open(EVAL / "manifest.jsonl") as manifest:
        entries = [json.loads(line) for line in manifest]
    chosen = [e for e in entries if e["id"].startswith("LJ") and 5 <= e["duration_s"] <= 12]
    return [chosen[i % len(chosen)] for i in range(count)]


def pcm(path: Path) -> bytes:
    from imageio_ffmpeg import get_ffmpeg_exe

    command = [get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-ac", "1", "-ar", str(RATE)]
    return subprocess.run([*command, "-f", "s16le", "-"], capture_output=True, check=True).stdout


def batches(url: str) -> tuple[float, float]:
    """(batches, batches of one item) of the model service's ``decode`` so far."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    count = single = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "bentoml_service_adaptive_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("method_name") != "decode":
                continue
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 1.0:
                single += sample.value
    return count, single


async def session(client: AsyncOpenAI, clip: dict, audio: bytes) -> dict:
    step = RATE // 10 * 2  # 100 ms of 16-bit samples
    data = audio + bytes(RATE * 2)  # 1 s of silence: server VAD ends the turn
    events: list[tuple[float, object]] = []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        await connection.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": RATE},
                        "transcription": {"model": "whisper-1", "language": "en"},
                        "turn_detection": {
                            "type": "server_vad",
                            "prefix_padding_ms": PREFIX_PADDING_MS,
                        },
                    }
                },
            }
        )
        start = time.monotonic()

        async def send() -> None:
            for n, offset in enumerate(range(0, len(data), step)):
                chunk = base64.b64encode(data[offset : offset + step]).decode()
                await connection.input_audio_buffer.append(audio=chunk)
                await asyncio.sleep(max(0.0, start + (n + 1) / 10 - time.monotonic()))

        sender = asyncio.create_task(send())
        async for event in connection:
            events.append((time.monotonic() - start, event))
            if event.type.endswith("input_audio_transcription.completed") and sender.done():
                break
            if event.type.endswith("input_audio_transcription.failed"):
                break
        await sender

    def first(kind: str) -> float | None:
        return next((t for t, e in events if e.type == kind), None)

    started = next(e for _, e in events if e.type == "input_audio_buffer.speech_started")
    onset = (started.audio_start_ms + PREFIX_PADDING_MS) / 1000
    stopped = first("input_audio_buffer.speech_stopped")
    delta = first("conversation.item.input_audio_transcription.delta")
    done = first("conversation.item.input_audio_transcription.completed")
    text = " ".join(e.transcript for _, e in events if e.type.endswith("transcription.completed"))
    # what a caption client shows: the deltas end to end (one turn per clip here); they end as
    # the completed transcript unless a partial sent words that the full decode revised
    shown = "".join(e.delta for _, e in events if e.type.endswith("transcription.delta"))
    norm = EnglishTextNormalizer()
    return {
        "clip": clip["id"],
        "seconds": clip["duration_s"],
        "first_delta_after_onset_s": None if delta is None else round(delta - onset, 3),
        "first_delta_before_speech_stopped": delta is not None
        and stopped is not None
        and delta < stopped,
        "completed_after_speech_stopped_s": None
        if done is None or stopped is None
        else round(done - stopped, 3),
        "deltas": sum(1 for _, e in events if e.type.endswith("transcription.delta")),
        "turns": sum(1 for _, e in events if e.type.endswith("transcription.completed")),
        "wer": round(jiwer.wer(norm(clip["text"]), norm(text)), 3),
        "transcript": text,
        "deltas_text": shown,
        "deltas_end_as_transcript": shown == text,
    }


async def main(args: argparse.Namespace) -> dict:
    chosen = clips(args.sessions)
    audio = [pcm(EVAL / clip["path"]) for clip in chosen]
    client = AsyncOpenAI(base_url=args.url + "/v1", api_key=args.api_key, max_retries=0)
    before = batches(args.url)
    results = await asyncio.gather(
        *(session(client, c, a) for c, a in zip(chosen, audio, strict=True))
    )
    after = batches(args.url)
    delays = [
        r["first_delta_after_onset_s"]
        for r in results
        if r["first_delta_after_onset_s"] is not None
    ]
    count, single = after[0] - before[0], after[1] - before[1]
    return {
        "sessions": args.sessions,
        "first_delta_after_onset_s": {
            "max": max(delays) if delays else None,
            "median": statistics.median(delays) if delays else None,
            "within_2s": sum(d <= 2.0 for d in delays),
            "missing": len(results) - len(delays),
        },
        "batches": {"count": count, "more_than_one_item": count - single},
        "mean_wer": round(statistics.mean(r["wer"] for r in results), 3),
        "deltas_end_as_transcript": sum(r["deltas_end_as_transcript"] for r in results),
        "per_session": results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="server root")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = json.dumps(asyncio.run(main(args)), indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
