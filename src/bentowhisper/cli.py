"""``bentowhisper`` command line: model housekeeping that happens before serving.

bentowhisper models list              the embedded models and where they are converted
bentowhisper models convert NAME      convert an embedded model (cached) and print its path
bentowhisper models import NAME       put a model into BentoML's model store, for bentos
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from .config import settings
from .engine.checkpoints import EMBEDDED, resolve_checkpoint

# What a transformers Whisper checkpoint needs at serving time (hub snapshots hold more).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt", "vocab.json"]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bentowhisper", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    models = commands.add_parser("models", help="model housekeeping").add_subparsers(
        dest="action", required=True
    )
    models.add_parser("list", help="list the embedded models")
    convert = models.add_parser("convert", help="convert an embedded model, print its path")
    convert.add_argument("name", choices=sorted(EMBEDDED))
    imported = models.add_parser("import", help="import a model into BentoML's model store")
    imported.add_argument("name", help="embedded name, local checkpoint directory or hub id")
    imported.add_argument("--tag", help="model store name (default: whisper-<name>)")
    args = parser.parse_args(argv)

    models_dir = settings().models_path
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
