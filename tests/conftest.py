"""Shared helpers: call the CLI as a user would, in a scratch folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it)",
)


def sslfuse(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``sslfuse <args>`` in ``cwd`` (its outputs/ lands there); fail loudly with its output."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_fusion.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sslfuse {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory) -> Path:
    """A folder where ``sslfuse run preset=smoke`` has run once (shared by the CLI tests)."""
    folder = tmp_path_factory.mktemp("smoke")
    sslfuse("run", "preset=smoke", "hydra.run.dir=first_run", cwd=folder)
    return folder
