"""The README's example is docs/example.py verbatim, and it runs as written."""

from __future__ import annotations

import os
import subprocess
import sys

from harness.paths import REPO_ROOT


def test_readme_shows_the_example_verbatim():
    example = (REPO_ROOT / "docs" / "example.py").read_text()
    assert example.strip() in (REPO_ROOT / "README.md").read_text()


def test_example_runs_as_written():
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docs" / "example.py")], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "InfEmbed-Rule:" in result.stdout and "opponents of the worst slice" in result.stdout
