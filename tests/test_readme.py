"""Every example in the README that talks to a running service prints what the README says.

The examples are the fenced ``bash`` blocks that address ``localhost:3000``; each runs from the
repository root with only the port changed to the test server's, and its output must be,
verbatim, the ``# `` comment lines that end the block.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from support import REPO_ROOT

README = REPO_ROOT / "README.md"


def examples() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if "localhost:3000" in block]


def shown_output(example: str) -> str:
    """The ``# `` comment lines that end the block, without the ``# ``."""
    lines = example.rstrip("\n").splitlines()
    shown: list[str] = []
    while lines and lines[-1].startswith("# "):
        shown.insert(0, lines.pop()[2:])
    return "\n".join(shown)


def test_the_readme_has_examples_with_their_output() -> None:
    assert len(examples()) >= 3  # curl, the openai SDK and the CLI
    assert all(shown_output(example) for example in examples())


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
    assert done.stdout.rstrip("\n") == shown_output(example)
