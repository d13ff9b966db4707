"""Us versus the peer, on this machine, with the same weights and clips, in one run.

For each embedded model (tiny.en, base) it starts each server in turn (ours in each of
``VARIANTS``, then the faster-whisper-server peer), runs the accuracy tool over the whole
eval set and the load tool over the English dev clips at 1, 4 and 16 concurrent clients, stops
it, and runs faster-whisper in-process over the same English clips (int8, the peer's setting,
and float32, which isolates what int8 changes); jfk alone, 8 times one after another, gives
each side's idle latency. Then, on our default
configuration, the head-of-line probe with a 10-minute file. Every command line it runs is
printed and stored beside the results (``--out``, default ``docs/results``).

    .venv/bin/python benchmarks/compare.py                  # everything (~30 min on 2 cores)
    .venv/bin/python benchmarks/compare.py --models tiny.en --skip-hol
    .venv/bin/python benchmarks/compare.py --cap-isa avx2 ...   # as an AVX2-only CPU would run

The peer needs ``benchmarks/peer/setup.sh`` first. Only loopback addresses are contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from bentowhisper.launcher import free_port, start_server

REPO = Path(__file__).resolve().parents[1]

PY = sys.executable
PEER_PY = REPO / "benchmarks/peer/.venv/bin/python"
ENGLISH_DEV = ["en_ljspeech", "en_librispeech", "en_misc", "fleurs_en"]
LEVELS = ["1", "4", "16"]
IDLE_REPEATS = 8  # jfk alone, one request after another: the idle latency
# Our server configurations: environment on top of the CPU profile.
VARIANTS = {
    "default": {},  # as shipped: dtype and quantization auto (engine/speed.py), hybrid attention
    "fp32": {"BENTOWHISPER_DTYPE": "float32", "BENTOWHISPER_ATTN_IMPLEMENTATION": "sdpa"},
    "int8": {"BENTOWHISPER_QUANTIZATION": "int8"},  # dynamic int8 linear layers (fp32 around)
    "fp32-hybrid": {"BENTOWHISPER_DTYPE": "float32"},  # the AVX2 default before quantization auto
}
# --cap-isa avx2: every engine (ours and the peer's) limited to AVX2, how the AVX2-only default
# is measured on a machine with AVX-512 and bf16 (torch's kernels, oneDNN, MKL, CTranslate2).
ISA_CAPS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "CT2_FORCE_CPU_ISA": "AVX2",
    }
}
# faster-whisper in-process: compute type and result-file suffix (int8 is the peer's setting)
FW_COMPUTE_TYPES = (("int8", ""), ("float32", "-float32"))


def run(command: list[str], log: list[str]) -> None:
    line = " ".join(shlex.quote(part) for part in command)
    print(f"\n$ {line}", flush=True)
    log.append(line)
    subprocess.run(command, check=True, cwd=REPO)


def measure(label: str, base_url: str, model: str, out: Path, args, log: list[str]) -> None:
    if args.wer:
        run(
            [PY, "benchmarks/evaluate.py", "--base-url", base_url, "--model", model,
             "--out", str(out / f"wer-{label}.json"), "--markdown", str(out / f"wer-{label}.md")],
            log,
        )  # fmt: skip
    run(
        [PY, "benchmarks/load.py", "--base-url", base_url, "--model", model, "--ids", "jfk",
         "--concurrency", "1", "--requests", str(IDLE_REPEATS), "--warmup", "2",
         "--out", str(out / f"idle-jfk-{label}.json")],
        log,
    )  # fmt: skip
    run(
        [PY, "benchmarks/load.py", "--base-url", base_url, "--model", model,
         "--groups", *ENGLISH_DEV, "--concurrency", *args.levels, "--requests", str(args.requests),
         "--warmup", "2", "--out", str(out / f"load-{label}.json"),
         "--plot", str(out / f"load-{label}.png")],
        log,
    )  # fmt: skip


def ours(model: str, variant: str, out: Path, args, log: list[str]) -> None:
    label = f"ours-{model}-{variant}"
    env = {
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOME": str(out / "tmp-bentoml-home"),
        "BENTOWHISPER_MODEL": model,
        **VARIANTS[variant],
    }
    if args.models_dir:
        env["BENTOWHISPER_MODELS_DIR"] = args.models_dir
    log.append(f"# {label}: {' '.join(f'{k}={v}' for k, v in env.items())} bentoml serve")
    logs = out / "tmp" / label  # each server's log kept for the run's post-mortem
    logs.mkdir(parents=True, exist_ok=True)
    server = start_server(log_dir=logs, env=env)
    try:
        server.wait_ready(timeout_s=600)  # a busy shared machine loads slowly
        measure(label, server.base_url, "whisper-1", out, args, log)
        if args.hol and model == "base" and variant == args.hol_variant:
            run(
                [PY, "benchmarks/hol.py", "--base-url", server.base_url, "--model", "whisper-1",
                 "--make-long", "600", "--warmup", "16", "--short-requests", "12",
                 "--language", "en", "--out", str(out / "hol-ours-base.json")],
                log,
            )  # fmt: skip
    finally:
        server.stop()


def peer(model: str, out: Path, args, log: list[str]) -> None:
    port = free_port()
    command = ["benchmarks/peer/serve.sh", model, str(port)]
    log.append(f"# peer-{model}: {' '.join(command)}")
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health")
        measure(f"peer-{model}", f"http://127.0.0.1:{port}/v1", "whisper-1", out, args, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _wait_http(url: str, deadline_s: float = 120.0) -> None:
    import httpx

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer in {deadline_s} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--hol-variant", default="default", help="server of the HOL probe")
    parser.add_argument("--levels", nargs="+", default=LEVELS, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=32, help="requests per load level")
    parser.add_argument("--models-dir", default=os.environ.get("BENTOWHISPER_MODELS_DIR"))
    parser.add_argument("--skip-peer", dest="peer", action="store_false")
    parser.add_argument(
        "--skip-peer-server", dest="peer_server", action="store_false",
        help="only faster-whisper in-process, not faster-whisper-server",
    )  # fmt: skip
    parser.add_argument("--skip-hol", dest="hol", action="store_false")
    parser.add_argument("--cap-isa", choices=list(ISA_CAPS), help="limit every engine to it")
    # the accuracy run is most of the time on a busy machine; benchmarks/speed_eval.py gives
    # the WER of precision variants in-process
    parser.add_argument("--skip-wer", dest="wer", action="store_false")
    parser.add_argument("--out", type=Path, default=REPO / "docs/results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    if args.cap_isa:  # inherited by every server and process started below
        os.environ.update(ISA_CAPS[args.cap_isa])
        log.append("# " + " ".join(f"{k}={v}" for k, v in ISA_CAPS[args.cap_isa].items()))
    started = time.time()
    for model in args.models:
        for variant in args.variants:
            ours(model, variant, args.out, args, log)
        if args.peer:
            if args.peer_server:
                peer(model, args.out, args, log)
            run(
                [str(PEER_PY), "benchmarks/peer/fw_inprocess.py", "--model", model,
                 "--compute-type", "int8", "--ids", "jfk", "--repeat", str(IDLE_REPEATS),
                 "--out", str(args.out / f"idle-jfk-fw-inprocess-{model}.json")],
                log,
            )  # fmt: skip
            for compute_type, suffix in FW_COMPUTE_TYPES:
                run(
                    [str(PEER_PY), "benchmarks/peer/fw_inprocess.py", "--model", model,
                     "--compute-type", compute_type, "--groups", *ENGLISH_DEV,
                     "--out", str(args.out / f"fw-inprocess-{model}{suffix}.json")],
                    log,
                )  # fmt: skip
    (args.out / "commands.json").write_text(
        json.dumps(
            {"started": started, "seconds": time.time() - started, "commands": log}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
