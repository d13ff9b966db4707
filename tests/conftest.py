"""Shared test fixtures: the converted embedded models and the session's server.

Helpers live in ``support.py``; this module only defines fixtures. In CI (``CI`` set) a
missing evaluation set fails the run at once instead of letting its tests skip.
"""

from __future__ import annotations

import os

# Two xdist workers and the servers share two cores: OpenMP threads that spin while they wait
# took the CPU from the others (as service.py explains). Set before torch loads, and inherited
# by the workers and every process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    EVAL_DIR,
    IDLE_TIMEOUT_S,
    MAX_MESSAGE_KB,
    MAX_SESSIONS,
    MAX_TURN_S,
    REPO_ROOT,
    audio_leftovers,
    serve_tiny,
    start_server,
)

# The test modules that use each session server (the fixtures below). ``make test`` runs two
# pytest-xdist workers: all of a server's modules go to one worker, so each server starts once,
# and every other module goes whole to one worker, so its module fixtures (loaded models,
# decoded runs) are made once. Collection fails when a module uses a server unlisted here.
SERVER_MODULES = {
    "server": {
        "test_bad_inputs",
        "test_chunked_server",
        "test_diarize_server",
        "test_docs",
        "test_fuzz",
        "test_readme",
        "test_service",
    },
    "tiny_server": {
        "test_cli",
        "test_faults",
        "test_playground",
        "test_realtime",
        "test_soak",
        "test_without_diarization",
    },
}
GROUP_OF = {module: server for server, modules in SERVER_MODULES.items() for module in modules}


@pytest.hookimpl(optionalhook=True)  # a plain run without xdist (-p no:xdist) still works
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Modules grouped as above: xdist's own ``loadgroup`` no longer works with pytest 9
    (it renames ``item._nodeid``, which pytest 9 does not read)."""
    from xdist.scheduler import LoadScopeScheduling

    class BySessionServer(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return GROUP_OF.get(Path(path).stem, path)

    return BySessionServer(config, log)


# The longest groups start first (``--no-loadscope-reorder`` keeps this order), so that none
# is left to run alone at the end: from the suite's durations on 2 cores.
LONGEST_FIRST = ("server", "tiny_server", "test_transcribe", "test_gpu_check", "test_instances")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        group = GROUP_OF.get(item.module.__name__, item.module.__name__)
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a group, the modules' own order
    for item in items:
        module = item.module.__name__
        for server in SERVER_MODULES:
            if server in item.fixturenames and GROUP_OF.get(module) != server:
                raise pytest.UsageError(
                    f"{item.nodeid} uses the session server {server!r}: add {module!r} to"
                    f" SERVER_MODULES[{server!r}] in tests/conftest.py"
                )


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("CI") and not (EVAL_DIR / "manifest.jsonl").is_file():
        raise pytest.UsageError(
            f"the evaluation set is missing at {EVAL_DIR} (set BENTOWHISPER_EVAL_DIR): in CI"
            " its tests must run, not skip"
        )


@pytest.fixture(scope="session")
def converted_models_dir() -> Path:
    """A models directory holding the converted embedded models (``tiny.en``, ``base``).

    ``BENTOWHISPER_MODELS_DIR`` if set, else the repository's git-ignored ``models/``, so the
    conversions (a few seconds each) are cached across test runs.
    """
    from bentowhisper.engine.checkpoints import EMBEDDED, ensure_converted

    models_dir = Path(os.environ.get("BENTOWHISPER_MODELS_DIR") or REPO_ROOT / "models")
    for model in EMBEDDED.values():
        ensure_converted(model, models_dir)
    return models_dir


@pytest.fixture(scope="session")
def server(converted_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``bentoml serve service:BentoWhisper`` on a free port, started from the repository root
    as a user would, and ready (``GET /readyz`` answered 200).

    Yields a :class:`support.BentoServer`: ``.url`` (``http://127.0.0.1:PORT``), ``.base_url``
    (``.url + "/v1"``), ``.port``, ``.log_path``, ``.log_tail()``, ``.track()``. Settings: the
    CPU profile with the converted models reused, ``BENTOWHISPER_MAX_UPLOAD_MB=4`` and
    ``BENTOWHISPER_API_KEY_FILE`` at ``.api_key_file``: empty (no authentication, so the README's
    examples run as written) until a test writes a key into it (see ``api_key``). At teardown the
    server is stopped (SIGINT, SIGINT, SIGKILL) and the fixture fails if any process it started
    (workers, FFmpeg) is still running.
    """
    import warnings

    tmp = tmp_path_factory.mktemp("bentoml-serve")
    env = {
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOME": str(tmp / "bentoml-home"),
        "BENTOWHISPER_MODELS_DIR": str(converted_models_dir),
        "BENTOWHISPER_API_KEY_FILE": str(tmp / "api-keys"),
        "BENTOWHISPER_MAX_UPLOAD_MB": "4",
    }
    (tmp / "api-keys").write_text("")
    running = start_server(log_dir=tmp, env=env)
    running.api_key_file = tmp / "api-keys"
    try:
        running.wait_ready()
    except BaseException:
        running.stop()
        raise
    yield running
    shutdown = running.stop()
    assert not shutdown.leftovers, (
        f"processes left after SIGKILL: {shutdown.leftovers}\n{running.log_tail()}"
    )
    if shutdown.killed:  # a server bug, but not one that should fail every test run
        warnings.warn(
            f"bentoml serve ignored SIGINT twice; SIGKILLed: {shutdown.killed}", stacklevel=1
        )


@pytest.fixture
def api_key(server) -> Iterator[str]:
    """Require a bearer key on the running server for one test (the key file is read per
    request, so keys rotate without a restart), then lift the requirement again."""
    key = "test-key"
    server.api_key_file.write_text(f"# rotated by the test\n{key}\n")
    try:
        yield key
    finally:
        server.api_key_file.write_text("")


@pytest.fixture(scope="session")
def tiny_server(converted_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``bentoml serve`` with tiny.en, no diarization, tight realtime limits (so that they can
    be hit) and a ``TMPDIR`` of its own (so that decoder temp dirs left behind show). The fault,
    CLI, realtime and playground tests share it, so it starts once. At teardown nothing it
    started may still run and no decoder temp dir may be left."""
    tmp = tmp_path_factory.mktemp("tiny-serve")
    (tmp / "api-keys").write_text("")
    running = serve_tiny(
        tmp,
        converted_models_dir,
        BENTOWHISPER_API_KEY_FILE=str(tmp / "api-keys"),
        BENTOWHISPER_REALTIME_MAX_TURN_S=str(MAX_TURN_S),
        BENTOWHISPER_REALTIME_MAX_MESSAGE_KB=str(MAX_MESSAGE_KB),
        BENTOWHISPER_REALTIME_IDLE_TIMEOUT_S=str(IDLE_TIMEOUT_S),
        BENTOWHISPER_REALTIME_MAX_SESSIONS=str(MAX_SESSIONS),
    )
    running.api_key_file = tmp / "api-keys"
    yield running
    running.track()  # a model worker restarted by the fault tests too
    shutdown = running.stop()
    assert not shutdown.leftovers, shutdown.leftovers
    assert not audio_leftovers(running), "decoder temp dirs left behind"
