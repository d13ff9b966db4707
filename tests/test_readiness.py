"""The readiness watcher's rule, with a scripted check (the served /readyz is in test_instances
and test_faults): ready on the first answer, and back to 503 only after failed checks in a row."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from bentowhisper.server import readiness
from bentowhisper.server.readiness import FAILURES_TO_UNREADY, Watcher


def readiness_after(outcomes: list[bool], monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Run a watcher over checks that answer (True) or fail (False, a dropped connection);
    return its readiness after each check."""
    monkeypatch.setattr(readiness, "INTERVAL_S", 0.0)
    monkeypatch.setattr(readiness, "RECHECK_S", 0.0)
    watcher = Watcher()
    before: list[bool] = []  # the readiness each check finds, i.e. what the previous one left

    async def check() -> dict[str, str]:
        before.append(watcher.ready)
        if len(before) > len(outcomes):
            raise asyncio.CancelledError  # the script is done: end the watcher
        if not outcomes[len(before) - 1]:
            raise OSError(32, "Broken pipe")
        return {"model": "tiny.en"}

    async def main() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await watcher.run(check, "http://localhost:3000")

    asyncio.run(main())
    return before[1:]


def test_one_dropped_connection_keeps_it_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FAILURES_TO_UNREADY == 2
    assert readiness_after([True, False, True, True], monkeypatch) == [True, True, True, True]


def test_failures_in_a_row_make_it_unready_and_an_answer_ready_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    got = readiness_after([False, True, False, False, False, True], monkeypatch)
    assert got == [False, True, True, False, False, True]
