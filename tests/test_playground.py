"""The playground page (``/playground``) in a real headless Chromium.

Chromium is Debian's ``chromium`` package (``apt-get install chromium``), driven over the
DevTools protocol with ``websockets``; its fake microphone plays a WAV made from a dev clip
(``--use-file-for-fake-audio-capture``). Set ``PLAYGROUND_SCREENSHOT=docs/img/playground.png``
to keep the screenshot taken at the end.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support import CLIP, free_port, httpx, reference, wer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",  # grant the microphone without a prompt
    "--window-size=1280,960",
]


class DevTools:
    """The DevTools protocol of one page: ``call`` a method, wait for its answer."""

    def __init__(self, socket) -> None:
        self.socket = socket
        self.ids = itertools.count(1)

    def call(self, method: str, **params: object) -> dict:
        request = next(self.ids)
        self.socket.send(json.dumps({"id": request, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == request:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture
def browser(tiny_server, tmp_path: Path):
    from websockets.sync.client import connect

    if CHROMIUM is None:
        pytest.fail("chromium is not installed: apt-get install chromium")
    fake_mic = tmp_path / "mic.wav"
    # the clip, then 2 s of silence so that server VAD ends the turn; Chromium loops the file
    subprocess.run(
        [*_ffmpeg_wav(CLIP), "-af", "apad=pad_dur=2", str(fake_mic)],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--use-file-for-fake-audio-capture={fake_mic}",
            f"--remote-debugging-port={port}",
            tiny_server.url + "/playground",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                page = next(p for p in pages if p["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as socket:
            tools = DevTools(socket)
            ready = "document.readyState === 'complete' && !!document.getElementById('record')"
            tools.wait_for(ready, 60)
            yield tools
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


def _ffmpeg_wav(path: Path) -> list[str]:
    from bentowhisper.server.audio import find_ffmpeg

    return [find_ffmpeg(), "-v", "error", "-y", "-i", str(path), "-ac", "1", "-ar", "16000"]


@pytest.mark.slow
def test_page_transcribes_a_file_and_the_microphone(browser) -> None:
    expected = reference(CLIP.stem)
    # A file, as plain text
    document = browser.call("DOM.getDocument")["root"]["nodeId"]
    node = browser.call("DOM.querySelector", nodeId=document, selector="#file")["nodeId"]
    browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(CLIP)])
    browser.js("document.getElementById('format').value = 'text'")
    browser.js("document.getElementById('file-go').click()")
    text = browser.wait_for(
        "(t => t && !t.startsWith('transcribing') && t)"
        "(document.getElementById('file-result').textContent)",
        240,
    )
    assert wer(expected, text) < 0.15, text
    # The fake microphone, with server VAD: deltas while speaking, then the completed turn
    browser.js("document.getElementById('record').click()")
    final = browser.wait_for(
        "(p => p && p.textContent)(document.querySelector('#transcript p.final'))", 240
    )
    log = browser.js("document.getElementById('events').textContent")
    assert "input_audio_buffer.speech_started" in log
    assert log.index("transcription.delta") < log.index("transcription.completed"), log
    assert wer(expected, final) < 0.15, final
    shot = browser.call("Page.captureScreenshot", format="png")["data"]
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        Path(os.environ["PLAYGROUND_SCREENSHOT"]).write_bytes(base64.b64decode(shot))
    browser.js("document.getElementById('stop').click()")
    assert browser.js("document.getElementById('status').textContent") == "idle"
