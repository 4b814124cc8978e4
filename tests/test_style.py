"""One formatter and one line length (``[tool.ruff]`` in pyproject.toml: 120 columns), checked in the fast tier."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_every_python_file_is_formatted_as_ruff_format_writes_it():
    proc = ruff("format", "--check", ".")
    assert proc.returncode == 0, f"run `.venv/bin/ruff format .`:\n{proc.stdout}{proc.stderr}"


def test_no_line_is_longer_than_120_columns_and_imports_are_sorted():
    proc = ruff("check", ".")
    assert proc.returncode == 0, f"run `.venv/bin/ruff check --fix .`:\n{proc.stdout}{proc.stderr}"
