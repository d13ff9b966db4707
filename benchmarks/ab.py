"""A/B on a noisy machine: two or more servers side by side, their requests interleaved.

Our 2-core machines are shared, and the same request on the same code took 6.2 s in one
minute and 16.2 s in the next. Each server here starts once and stays idle while another
answers: round k sends each file to every server in turn (the order reversed every other
round), so a slow minute slows every server alike. Per server and file: the median and the
fastest time, the WER where a reference is known, and each server's median over the first's.

With ``--peer``, faster-whisper's batched pipeline (batch 8, int8, greedy, on the same
CTranslate2 weights, ``peer/fw_longform.py --serve``) takes its turn in every round too, in
its own process, idle while the others answer.

A server is ``NAME=ENV,ENV...``: ``PYTHONPATH=<checkout>/src`` serves another checkout's code
(its service.py is this checkout's), ``BENTOWHISPER_<KEY>=<value>`` another setting.

    .venv/bin/python benchmarks/ab.py --server main=PYTHONPATH=../main/src \\
        --server here=PYTHONPATH=src --repeats 5 --out docs/results/ab.json

Files: the dev set's 106 s long-form clip unless ``--files`` names others (with
``--references`` as text files, in the same order, for their WER). Only loopback addresses
are contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import subprocess
from pathlib import Path

from evaluate import load_manifest
from longform import EVAL, LONGFORM_ID, PEER_PY, REPO, transcribe, warm_up, wer

from bentowhisper.launcher import start_server

PEER = "faster-whisper-batched"


def parse_server(spec: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = spec.partition("=")
    env = dict(pair.split("=", 1) for pair in assignments.split(",") if pair)
    if "PYTHONPATH" in env:
        env["PYTHONPATH"] = str(Path(env["PYTHONPATH"]).resolve())
    return name, env


class Peer:
    """faster-whisper in its own venv, one file per request over stdin/stdout."""

    def __init__(self, model: str) -> None:
        self.proc = subprocess.Popen(
            [str(PEER_PY), "benchmarks/peer/fw_longform.py", "--model", model,
             "--serve", "batched"],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert json.loads(self.proc.stdout.readline()).get("ready")

    async def transcribe(self, path: Path) -> tuple[float, str]:
        def ask() -> dict:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

        answer = await asyncio.to_thread(ask)
        return answer["seconds"], answer["text"]

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


async def measure(urls: dict[str, str], peer: Peer | None, files: list[Path],
                  references: dict[Path, str], repeats: int) -> dict:  # fmt: skip
    from openai import AsyncOpenAI

    clients = {
        name: AsyncOpenAI(base_url=url, api_key="none", timeout=1800, max_retries=0)
        for name, url in urls.items()
    }
    for client in clients.values():
        await warm_up(client)
    calls = {name: functools.partial(transcribe, client) for name, client in clients.items()}
    if peer is not None:
        calls[PEER] = peer.transcribe
    runs: dict[str, dict[str, list[dict]]] = {n: {f.name: [] for f in files} for n in calls}
    for k in range(repeats):
        order = list(calls.items())
        for path in files:
            for name, call in order if k % 2 == 0 else order[::-1]:
                seconds, text = await call(path)
                run = {"seconds": seconds}
                if path in references:
                    run["wer"] = wer(references[path], text)
                runs[name][path.name].append(run)
                print(f"round {k} {name} {path.name}: {seconds:.2f} s", flush=True)
    for client in clients.values():
        await client.close()
    first = next(iter(runs))
    summary = {}
    for name, by_file in runs.items():
        summary[name] = {}
        for file, file_runs in by_file.items():
            times = [r["seconds"] for r in file_runs]
            base = statistics.median(r["seconds"] for r in runs[first][file])
            summary[name][file] = {
                "median_s": statistics.median(times),
                "min_s": min(times),
                "wer": [r["wer"] for r in file_runs if "wer" in r],
                "median_over_first": statistics.median(times) / base,
            }
    return {"runs": runs, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", action="append", required=True, help="NAME=ENV,ENV...")
    p.add_argument("--files", nargs="+", type=Path)
    p.add_argument("--references", nargs="+", type=Path, default=[])
    p.add_argument("--model", default="base")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peer", action="store_true", help="faster-whisper in the rotation too")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.files:
        files = list(args.files)
        references = {f: r.read_text() for f, r in zip(files, args.references, strict=False)}
    else:
        clip = next(c for c in load_manifest(EVAL / "manifest.jsonl") if c.id == LONGFORM_ID)
        files, references = [Path(clip.path)], {Path(clip.path): clip.text}
    servers, peer = {}, None
    try:
        if args.peer:
            peer = Peer(args.model)
        for spec in args.server:
            name, env = parse_server(spec)
            env = {"BENTOWHISPER_MODEL": args.model, "BENTOWHISPER_DIARIZATION": "false", **env}
            servers[name] = start_server(log_dir=args.out.parent / "tmp" / f"ab-{name}", env=env)
        for server in servers.values():
            server.wait_ready()
        urls = {n: s.base_url for n, s in servers.items()}
        report = asyncio.run(measure(urls, peer, files, references, args.repeats))
    finally:
        for server in servers.values():
            server.stop()
        if peer is not None:
            peer.stop()
    report["servers"] = args.server
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, by_file in report["summary"].items():
        for file, s in by_file.items():
            print(f"{name} {file}: median {s['median_s']:.2f} s, fastest {s['min_s']:.2f} s, "
                  f"{s['median_over_first']:.2f}x the first server")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
