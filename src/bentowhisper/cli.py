"""``bentowhisper`` command line: serve, transcribe files, and model housekeeping.

bentowhisper serve [--model M] [--port P] [--config F]    run the service (bentoml serve)
bentowhisper transcribe FILE... [--format F] [--language L] [--model M] [--output-dir D]
                                                          transcribe in this process
bentowhisper transcribe FILE... --url URL                 ... or through a running server
bentowhisper models list              the embedded models and where they are converted
bentowhisper models convert NAME      convert an embedded model (cached) and print its path
bentowhisper models import NAME       put a model into BentoML's model store, for bentos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Settings, load_settings
from .engine.checkpoints import EMBEDDED, resolve_checkpoint
from .launcher import serve_command, serve_env

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .server.longform import TranscriptionEvent
    from .transcript import Transcription
    from .wire import DecodeJob, DecodeResult

# What a transformers Whisper checkpoint needs at serving time (hub snapshots hold more).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt", "vocab.json"]
FORMATS = ("text", "json", "verbose_json", "srt", "vtt")
EXTENSIONS = {"text": "txt", "json": "json", "verbose_json": "json", "srt": "srt", "vtt": "vtt"}
# Audio up to one 30 s window is decoded in one step: a progress bar would only flash.
PROGRESS_MIN_SECONDS = 30.0


def default_tag(name: str) -> str:
    """``base`` -> ``whisper-base``, ``openai/whisper-large-v3-turbo`` -> ``whisper-large-v3-turbo``
    (the name bentofile.yaml expects), ``distil-whisper/distil-large-v3`` ->
    ``whisper-distil-large-v3``; a directory gives its own name."""
    last = re.sub(r"[^a-z0-9_.-]+", "-", Path(name.rstrip("/")).name.lower()).strip("-.")
    return last if last.startswith("whisper") else f"whisper-{last}"


def import_model(name: str, models_dir: Path, tag: str | None = None) -> str:
    """Copy a checkpoint (embedded, local or hub) into the BentoML model store; return its tag.

    A Bento that references the tag carries the weights, so replicas never download a model.
    """
    import bentoml

    checkpoint = resolve_checkpoint(name, models_dir)
    store_name = tag or default_tag(name)
    with bentoml.models.create(store_name, labels={"source": name}) as stored:
        if Path(checkpoint).is_dir():
            shutil.copytree(checkpoint, stored.path, dirs_exist_ok=True)
        else:
            from huggingface_hub import snapshot_download

            snapshot_download(checkpoint, local_dir=stored.path, allow_patterns=CHECKPOINT_FILES)
    return str(stored.tag)


# --------------------------------------------------------------------------------------------
# serve


def serve(port: int, host: str | None, model: str | None, config: str | None) -> int:
    """Replace this process by ``bentoml serve``, so signals (Ctrl-C, SIGTERM) reach it."""
    env = serve_env(model=model, config=config)
    try:  # a bad profile fails here, with its message, not in a worker's traceback
        load_settings(env)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    command = serve_command(port, host)
    os.execve(command[0], command, env)
    return 0  # not reached


# --------------------------------------------------------------------------------------------
# transcribe


def transcribe_local(
    files: list[Path],
    response_format: str,
    language: str | None,
    settings: Settings,
    output_dir: Path | None,
) -> int:
    """Transcribe ``files`` with the engine in this process, as the service would one request
    at a time (same settings, same 30 s windows and slices); return the exit status."""
    from .engine.checkpoints import resolve_checkpoint
    from .server.audio import SAMPLE_RATE, AudioDecodeError, decode_audio
    from .server.chunked import request_events
    from .server.features import LogMel
    from .server.formats import render
    from .server.longform import TranscribeOptions
    from .server.protocol import TranscriptionRequest
    from .vocabulary import load_vocabulary

    # The tokenizer alone tells whether the model knows the language: a mistyped option fails
    # in seconds, before torch is imported and the model loaded.
    checkpoint = resolve_checkpoint(settings.model, settings.models_path)
    if language is not None and language not in load_vocabulary(checkpoint).languages:
        return _fail(f"the model {settings.model!r} is English-only; --language {language}")

    from .engine.decoding import EncoderCache, decode_batch
    from .engine.loading import load_from_settings

    bundle = load_from_settings(settings, checkpoint)
    request = TranscriptionRequest(
        model=settings.model, response_format=response_format, language=language
    )
    options = TranscribeOptions(language=language, slice_tokens=settings.slice_tokens or None)
    cache = EncoderCache(capacity=2)
    features = LogMel.from_checkpoint(bundle.checkpoint)

    async def decode(jobs: list[DecodeJob]) -> list[DecodeResult]:
        # On the loop's own thread: it loaded the model, and torch runs slower on others.
        return decode_batch(bundle, jobs, cache)

    status = 0
    for path in files:
        try:
            audio = decode_audio(path, timeout_s=settings.decode_timeout_s)
        except (OSError, AudioDecodeError) as exc:
            status = _fail(f"{path}: {exc}")
            continue
        events = request_events(audio, None, options, decode, bundle.vocab, features, settings)
        result = asyncio.run(_with_progress(events, len(audio) / SAMPLE_RATE, path.name))
        body, _ = render(result, request)
        _emit(path, _as_text(body), response_format, output_dir)
    return status


async def _with_progress(
    events: AsyncIterator[TranscriptionEvent], seconds: float, name: str
) -> Transcription:
    """The transcription the events end with, and a progress bar in audio seconds on stderr
    while they come (for files over ``PROGRESS_MIN_SECONDS``)."""
    from tqdm import tqdm

    from .server.longform import SegmentDecoded

    total = round(seconds, 1)
    with tqdm(
        total=total,
        unit="s",
        desc=name,
        file=sys.stderr,
        disable=total <= PROGRESS_MIN_SECONDS,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}]",
    ) as bar:
        async for event in events:
            if isinstance(event, SegmentDecoded):
                bar.update(max(0.0, min(round(event.segment.end, 1), total) - bar.n))
            else:
                bar.update(total - bar.n)
                return event.transcription
    raise AssertionError("the events end with TranscriptionDone")


def transcribe_remote(
    files: list[Path],
    response_format: str,
    language: str | None,
    model: str | None,
    url: str,
    output_dir: Path | None,
) -> int:
    """Send ``files`` to a running server with the ``openai`` SDK; write what it returns."""
    import openai

    base_url = url.rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    # Any key does for a server without keys; the SDK insists on one.
    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "none")
    extra = {"language": language} if language else {}
    status = 0
    for path in files:
        try:
            with open(path, "rb") as audio:
                raw = client.audio.transcriptions.with_raw_response.create(
                    model=model or "whisper-1", file=audio, response_format=response_format, **extra
                )
        except OSError as exc:
            status = _fail(f"{path}: {exc}")
            continue
        except openai.APIError as exc:
            status = _fail(f"{path}: {exc.message}")
            continue
        _emit(path, raw.text, response_format, output_dir)
    return status


def _as_text(body: str | dict) -> str:
    # The bytes the service sends: Starlette's JSONResponse encodes exactly so.
    if isinstance(body, str):
        return body
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _emit(path: Path, body: str, response_format: str, output_dir: Path | None) -> None:
    """``output_dir/<stem>.<ext>`` (its path on stderr), else the body on stdout."""
    if output_dir is None:
        sys.stdout.write(body if body.endswith("\n") else body + "\n")
        sys.stdout.flush()
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{path.stem}.{EXTENSIONS[response_format]}"
    target.write_text(body, encoding="utf-8")
    print(target, file=sys.stderr)


def _fail(message: str) -> int:
    print(f"bentowhisper: {message}", file=sys.stderr)
    return 1


def _language(value: str) -> str:
    from .server.protocol import normalize_language

    try:
        return normalize_language(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a language Whisper knows: {value!r}") from None


# --------------------------------------------------------------------------------------------
# the command line


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="bentowhisper",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    commands = top.add_subparsers(dest="command", required=True)

    served = commands.add_parser("serve", help="run the service (bentoml serve)")
    served.add_argument("--model", help="embedded name, checkpoint directory or hub id")
    served.add_argument("--port", type=int, default=3000, help="default: 3000")
    served.add_argument("--host", help="address to bind (default: BentoML's, all interfaces)")
    served.add_argument("--config", help="settings profile (default: configs/cpu.yaml)")

    files = commands.add_parser("transcribe", help="transcribe audio files")
    files.add_argument("files", nargs="+", type=Path, metavar="FILE")
    files.add_argument("--format", choices=FORMATS, default="text", dest="response_format")
    files.add_argument("--language", type=_language, help="ISO-639-1 code; default: detected")
    files.add_argument("--model", help="model to load (with --url: the model name to send)")
    files.add_argument("--config", help="settings profile for the in-process engine")
    files.add_argument("--output-dir", type=Path, help="write FILE's stem + extension there")
    files.add_argument("--url", help="a running server (http://HOST:PORT) to send the files to")

    models = commands.add_parser("models", help="model housekeeping").add_subparsers(
        dest="action", required=True
    )
    models.add_parser("list", help="list the embedded models")
    convert = models.add_parser("convert", help="convert an embedded model, print its path")
    convert.add_argument("name", choices=sorted(EMBEDDED))
    imported = models.add_parser("import", help="import a model into BentoML's model store")
    imported.add_argument("name", help="embedded name, local checkpoint directory or hub id")
    imported.add_argument("--tag", help="model store name (default: whisper-<name>)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        return serve(args.port, args.host, args.model, args.config)
    if args.command == "transcribe":
        if args.url:
            return transcribe_remote(
                args.files,
                args.response_format,
                args.language,
                args.model,
                args.url,
                args.output_dir,
            )
        try:
            settings = load_settings(serve_env(model=args.model, config=args.config))
        except (OSError, ValueError) as exc:
            return _fail(str(exc))
        return transcribe_local(
            args.files, args.response_format, args.language, settings, args.output_dir
        )

    models_dir = load_settings().models_path
    if args.action == "list":
        for name in EMBEDDED:
            print(f"{name}\t{models_dir / name}")
    elif args.action == "convert":
        print(resolve_checkpoint(args.name, models_dir))
    else:
        print(import_model(args.name, models_dir, args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
