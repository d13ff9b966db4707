"""The API docs work offline, and no page the service serves loads anything from elsewhere.

Headless Chromium renders the real server's pages with every host but 127.0.0.1 unresolvable
(``--host-resolver-rules``), so a CDN asset would fail to load, and records its requests in a
net log: every request a page makes must go to the server itself. Chromium's own background
requests (sign-in, time sync) have no page as initiator and are left out.
docs/img/docs-offline.png is the screenshot :func:`test_swagger_ui_renders_offline` takes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

try:  # openai >= 3 talks through the httpx2 fork
    import httpx
except ImportError:  # pragma: no cover - depends on the installed packages
    import httpx2 as httpx

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    # Offline for the pages: any host but the server's fails to resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    # Time for the scripts to fetch /openapi.json and render it.
    "--virtual-time-budget=15000",
]
OPERATIONS = {
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/models",
    "/v1/models/{model_id}",
}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.fail("no Chromium on PATH (.ci/run installs it: apt-get install -y chromium)")


def browse(url: str, tmp_path: Path, *action: str) -> tuple[str, list[str]]:
    """Run Chromium on ``url`` with ``action`` (``--dump-dom`` or ``--screenshot=...``);
    return its stdout and the URLs the page requested (from the net log)."""
    net_log = tmp_path / "net-log.json"
    done = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--log-net-log={net_log}",
            *action,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    # Navigations and the page's own requests (those have the page as initiator), not
    # Chromium's background ones. Only a job's start event carries its URL.
    requested = []
    for event in log["events"]:
        params = event.get("params", {})
        if event["type"] != start_job or "url" not in params:
            continue
        if params.get("initiator", "").startswith("http") or params["url"].startswith(url):
            requested.append(params["url"])
    return done.stdout, requested


def test_swagger_ui_renders_offline(server, tmp_path: Path) -> None:
    dom, requested = browse(server.url + "/docs", tmp_path, "--dump-dom")
    # Swagger UI rendered the operations from /openapi.json.
    assert "<title>bentowhisper API</title>" in dom
    assert set(re.findall(r'data-path="([^"]+)"', dom)) >= OPERATIONS, dom[-3000:]
    assert all(url.startswith(server.url + "/") for url in requested), requested
    assert server.url + "/openapi.json" in requested
    assert server.url + "/docs/assets/swagger-ui-bundle.js" in requested

    screenshot = tmp_path / "docs-offline.png"
    browse(server.url + "/docs", tmp_path, "--window-size=1280,1100", f"--screenshot={screenshot}")
    with Image.open(screenshot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "a blank page"  # rendered text and coloured method badges


def test_redoc_renders_offline(server, tmp_path: Path) -> None:
    dom, requested = browse(server.url + "/redoc", tmp_path, "--dump-dom")
    assert "/v1/audio/transcriptions" in dom and "Create Transcription" in dom, dom[-3000:]
    assert all(url.startswith(server.url + "/") for url in requested), requested
    assert server.url + "/docs/assets/redoc.standalone.js" in requested


def test_home_leads_to_the_playground_and_no_page_links_elsewhere(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        home = client.get("/")
        assert home.status_code == 307 and home.headers["location"] == "/playground"
        assert "googletagmanager" not in client.get("/", follow_redirects=True).text
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            linked = re.findall(r'(?:src|href)="([^"]*)"', html)
            assert linked and all(link.startswith("/docs/assets/") for link in linked), linked
            assert "googletagmanager" not in html and "cdn." not in html
            assert (
                client.get(page)
                .headers["content-security-policy"]
                .startswith("default-src 'self';")
            )
            for link in linked:
                assert client.get(link).status_code == 200, link
