"""Every example in the README that talks to a running service works as written.

The examples are the fenced ``bash`` blocks that address ``localhost:3000``; each runs from the
repository root with only the port changed to the test server's.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from support import REPO_ROOT

README = REPO_ROOT / "README.md"
EXPECTED = "ask not what your country can do for you"


def examples() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if "localhost:3000" in block]


def test_the_readme_has_examples() -> None:
    assert len(examples()) >= 2  # a curl and an openai SDK example


@pytest.mark.parametrize("example", examples(), ids=lambda block: block.split()[0])
def test_readme_example(example: str, server, tmp_path: Path) -> None:
    script = example.replace("localhost:3000", f"127.0.0.1:{server.port}")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert EXPECTED in done.stdout.lower().replace(",", ""), done.stdout
