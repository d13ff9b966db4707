"""The CPU Bento, built and served offline the way docs/deploy.md says.

In a temporary ``BENTOML_HOME``: ``bentowhisper models import base`` puts the converted embedded
model into BentoML's model store, ``bentoml build -f bentofile.cpu.yaml`` builds the Bento from
the repository root, and the tests read what the Bento holds (bento.yaml, src/, the generated
Dockerfile and requirements). Then ``bentoml serve <tag>`` serves it from an unrelated
directory, with the Bento's runtime envs set as its container image sets them (``bentoml serve``
of a Bento tag does not apply them itself), and the official ``openai`` SDK transcribes a clip.
``BENTOWHISPER_MODELS_DIR`` points at an empty directory during serving: a fallback to
converting the embedded model, instead of loading the Bento's model, would write there.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI
from support import EVAL_DIR, BentoServer, bentoml_command, free_port, reference
from whisper_normalizer.english import EnglishTextNormalizer

REPO_ROOT = Path(__file__).resolve().parents[1]
JFK = EVAL_DIR / "audio/en_misc/jfk.flac"
BENTOFILE = REPO_ROOT / "bentofile.cpu.yaml"
STEP_TIMEOUT_S = 300

english = EnglishTextNormalizer()


@dataclass(frozen=True)
class BuiltBento:
    tag: str
    model_tag: str
    path: Path
    home: Path
    info: dict[str, Any]
    env: dict[str, str]  # BENTOML_HOME and friends, for further bentoml commands


def run(command: list[str], env: dict[str, str], cwd: Path = REPO_ROOT) -> str:
    done = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
    )
    assert done.returncode == 0, (
        f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
        f"{done.stderr[-3000:]}"
    )
    return done.stdout


def base_env(home: Path) -> dict[str, str]:
    """This process's environment without any BENTOWHISPER_/BENTOML_ settings, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENTOWHISPER_", "BENTOML_"))}
    env.update({"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@pytest.fixture(scope="module")
def bento(converted_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BuiltBento:
    home = tmp_path_factory.mktemp("bento") / "bentoml-home"
    env = base_env(home)
    imported = run(
        [sys.executable, "-m", "bentowhisper.cli", "models", "import", "base"],
        {**env, "BENTOWHISPER_MODELS_DIR": str(converted_models_dir)},
    )
    model_tag = imported.strip().splitlines()[-1]
    assert re.fullmatch(r"whisper-base:[a-z0-9]+", model_tag), imported
    # As docs/deploy.md builds it: with the Bento's model tag exported, service.py references
    # the model, so bento.yaml records it for each service (BentoCloud reads that).
    stored = yaml.safe_load(BENTOFILE.read_text())["models"][0]
    built = run(
        [*bentoml_command(), "build", "-f", BENTOFILE.name, "--output", "tag"],
        {**env, "BENTOWHISPER_BENTO_MODEL": stored},
    )
    match = re.search(r"__tag__:(\S+)", built)
    assert match, built
    tag = match.group(1)
    name, version = tag.split(":")
    path = home / "bentos" / name / version
    info = yaml.safe_load((path / "bento.yaml").read_text())
    return BuiltBento(tag=tag, model_tag=model_tag, path=path, home=home, info=info, env=env)


# --------------------------------------------------------------------------------------------
# what the Bento holds


def test_bento_packs_the_model(bento: BuiltBento) -> None:
    assert bento.tag.startswith("bentowhisper-cpu:")
    assert [m["tag"] for m in bento.info["models"]] == [bento.model_tag]
    runtime_envs = {e["name"]: e["value"] for e in bento.info["envs"] if e["stage"] != "build"}
    assert runtime_envs["BENTOWHISPER_BENTO_MODEL"] == "whisper-base:latest"
    assert runtime_envs["BENTOML_DO_NOT_TRACK"] == "true"


def test_bento_services(bento: BuiltBento) -> None:
    info = bento.info
    assert info["service"] == "service:BentoWhisper"
    assert info["entry_service"] == "bentowhisper"
    services = {svc["name"]: svc for svc in info["services"]}
    assert set(services) == {"bentowhisper", "whisper-model", "speaker-encoder"}
    assert services["bentowhisper"]["dependencies"] == [
        {"service": "whisper-model"},
        {"service": "speaker-encoder"},
    ]
    assert services["whisper-model"]["dependencies"] == []
    assert services["speaker-encoder"]["dependencies"] == []
    # The encoder's weights come with the resemblyzer package (setup_script), not the store.
    assert services["speaker-encoder"]["models"] == []
    assert services["speaker-encoder"]["config"]["resources"] == {"cpu": "1"}
    for svc in services.values():
        if svc["name"] != "speaker-encoder":
            assert [m["tag"] for m in svc["models"]] == [bento.model_tag], svc["name"]
        assert svc["config"]["traffic"]["timeout"] == 600
        assert svc["config"]["workers"] == 1
    # The CPU profile at build time: the model service asks for a CPU, not a GPU.
    assert services["whisper-model"]["config"]["resources"] == {"cpu": "1"}


def test_bento_source(bento: BuiltBento) -> None:
    src = bento.path / "src"
    assert (src / "service.py").read_text() == (REPO_ROOT / "service.py").read_text()
    package = {p.name for p in (src / "bentowhisper").glob("*.py")}
    assert package == {p.name for p in (REPO_ROOT / "src" / "bentowhisper").glob("*.py")}
    assert "__init__.py" in package and "config.py" in package
    for profile in ("cpu.yaml", "gpu.yaml"):
        shipped = (src / "configs" / profile).read_text()
        assert shipped == (REPO_ROOT / "configs" / profile).read_text()
    # Nothing of the repository's other files (tests, models, benchmarks) is packed.
    assert not (src / "tests").exists() and not (src / "models").exists()


def test_bento_image(bento: BuiltBento) -> None:
    dockerfile = (bento.path / "env" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^RUN apt-get install .*\bffmpeg\b", dockerfile, re.M), dockerfile
    # The image, unlike `bentoml serve <tag>`, sets the Bento's envs: what makes the container
    # load the packed model.
    assert re.search(r"^ENV BENTOWHISPER_BENTO_MODEL=", dockerfile, re.M)
    assert bento.info["image"]["python_version"] == "3.11"
    requirements = (bento.path / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0+cpu" in requirements
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    torch_pins = [line for line in requirements if re.match(r"torch\b", line)]
    assert torch_pins == ["torch==2.13.0+cpu"]
    # resemblyzer without its dependencies (a requirements line cannot ask for that): the
    # setup_script, which BentoML stores as script__<hash> and runs after the requirements.
    (script,) = (bento.path / "env" / "docker").glob("script__*")
    assert 'uv pip install --no-deps "resemblyzer==0.1.4"' in script.read_text()
    run_script = dockerfile.index(f"&& ./env/docker/{script.name}")
    assert dockerfile.index("pip install -r $BENTO_PATH/env/python/requirements.txt") < run_script


# --------------------------------------------------------------------------------------------
# serving it


@pytest.fixture(scope="module")
def served(bento: BuiltBento, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("bento-serve")
    empty_models = workdir / "models"
    empty_models.mkdir()
    runtime_envs = {e["name"]: e["value"] for e in bento.info["envs"] if e["stage"] != "build"}
    env = {**bento.env, **runtime_envs, "BENTOWHISPER_MODELS_DIR": str(empty_models)}
    port = free_port()
    log_path = workdir / "bentoml-serve.log"
    command = [*bentoml_command(), "serve", bento.tag, "--port", str(port)]
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            command,
            cwd=workdir,  # not the repository: everything must come from the Bento
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = BentoServer(proc=proc, port=port, log_path=log_path, env=env)
    try:
        server.wait_ready()  # /readyz 200, 2 s probe timeouts, 120 s deadline
    except BaseException:
        server.stop()
        raise
    server.empty_models = empty_models
    yield server
    shutdown = server.stop()  # SIGINT to the group, 10 s, SIGINT, 5 s, then SIGKILL
    assert not shutdown.leftovers, f"left running: {shutdown.leftovers}\n{server.log_tail()}"
    if shutdown.killed:
        warnings.warn(f"bentoml serve needed SIGKILL: {shutdown.killed}", stacklevel=1)


def test_served_bento_transcribes(served: Any, bento: BuiltBento) -> None:
    assert JFK.exists(), f"eval set not found at {EVAL_DIR}"
    with (
        OpenAI(base_url=served.base_url, api_key="none", max_retries=0, timeout=60) as client,
        open(JFK, "rb") as audio,
    ):
        result = client.audio.transcriptions.create(model="whisper-1", file=audio)
        models = [m.id for m in client.models.list().data]
    assert "whisper-1" in models
    assert english(result.text).split() == english(reference("jfk")).split(), result.text
    # Loaded from the Bento's model (store), not converted from the embedded packages.
    assert not any(served.empty_models.iterdir()), list(served.empty_models.iterdir())
    # The code that runs is the Bento's copy: the workers run in its src/ directory.
    cwds = set()
    for pid, _ in served.track():
        with contextlib.suppress(OSError):
            cwds.add(os.readlink(f"/proc/{pid}/cwd"))
    assert str(bento.path / "src") in cwds, (cwds, served.log_tail())


def alive(pid: int, start: int) -> bool:
    """Whether process ``pid`` started at ``start`` (clock ticks) still runs (not a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[19]) == start


def in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=2).text
    return sum(
        float(value)
        for labels, value in re.findall(
            r"^bentoml_service_request_in_progress\{(.*)\} (\S+)$", text, re.M
        )
        if 'runner_name="bentowhisper"' in labels and "/audio/" in labels
    )


def test_prestop_drains_then_stops(served: Any) -> None:
    """deploy/kubernetes' preStop hook against the served Bento, the last test here: while a
    request runs it waits, then it stops `bentoml serve` (standing in for the container's
    PID 1) and nothing of the server is left."""
    deployment = yaml.safe_load((REPO_ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    script = main["lifecycle"]["preStop"]["exec"]["command"][2]

    result: dict[str, Any] = {}

    def transcribe() -> None:
        with (
            OpenAI(base_url=served.base_url, api_key="none", max_retries=0, timeout=60) as client,
            open(JFK, "rb") as audio,
        ):
            response = client.audio.transcriptions.create(model="whisper-1", file=audio)
        result["text"] = response.text

    request = threading.Thread(target=transcribe)
    request.start()
    deadline = time.monotonic() + 10
    while in_flight(served.url) < 1 and request.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request.is_alive(), "the request finished before the drain could start"
    served.track()
    env = {
        "PATH": "/usr/bin:/bin",
        "BENTOML_PORT": str(served.port),
        "PRESTOP_SLEEP_S": "0",
        "SERVER_PID": str(served.proc.pid),
        "STOP_TIMEOUT_S": "10",
    }
    hook = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=90
    )
    request.join(60)
    assert hook.returncode == 0, hook.stderr
    # The request was answered in full before the server was told to stop.
    assert english(result.get("text", "")).split() == english(reference("jfk")).split(), result
    served.proc.wait(timeout=15)
    left = [f"{pid}: {cmd}" for (pid, start), cmd in served.seen.items() if alive(pid, start)]
    assert not left, f"still running after the hook: {left}\n{served.log_tail()}"
    if "SIGKILLed 0 " not in hook.stdout:
        warnings.warn(f"bentoml serve hung on SIGTERM: {hook.stdout.strip()}", stacklevel=1)
