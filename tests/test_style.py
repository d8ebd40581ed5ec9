"""The code is formatted and linted as pyproject.toml's [tool.ruff] says (CI runs the same two commands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("format", "--check", "."), ("check", ".")], ids=["format", "lint"])
def test_ruff_passes(args):
    proc = _ruff(*args)
    assert proc.returncode == 0, f"ruff {' '.join(args)} (fix: ruff format . && ruff check --fix .):\n{proc.stdout}"


def test_ruff_notices_a_badly_formatted_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = [1,2 ,3]\nimport os\n")
    assert _ruff("format", "--check", "--config", str(ROOT / "pyproject.toml"), str(bad)).returncode == 1
    assert _ruff("check", "--config", str(ROOT / "pyproject.toml"), str(bad)).returncode == 1


def test_no_formatter_escapes_left():
    marker = "fmt: " + "skip"  # written apart so this file does not hold the marker it looks for
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = [name for name in tracked.stdout.split() if marker in (ROOT / name).read_text()]
    assert not found, f"formatter escapes in {found}"
