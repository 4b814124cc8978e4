"""scripts/gpu_check.sh: refused in one line without a CUDA device; its CPU dry run writes the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def run(tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "OPENBLAS_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run(
        ["bash", str(REPO / "scripts/gpu_check.sh")], env=environment, capture_output=True, text=True, timeout=900
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_device_is_refused(tmp_path):
    proc = run(tmp_path, GPU_CHECK_DEVICE="tpu")
    assert proc.returncode == 2 and "must be cuda or cpu" in proc.stderr


@pytest.mark.slow
def test_the_cpu_dry_run_writes_one_row_per_stage(tmp_path):
    proc = run(tmp_path, GPU_CHECK_DEVICE="cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "out/gpu_check.md").read_text()
    assert "| stage | sslfuse img/s | bare loop img/s | ratio |" in table and table in proc.stdout
    rows = json.loads((tmp_path / "out/gpu_check.json").read_text())["rows"]
    assert [r["stage"].split(" (")[0] for r in rows] == [
        "pretrain simclr",
        "cache simclr",
        "cache external resnet50 at 32 px",
    ]
    for r in rows:
        assert (
            r["sslfuse_img_s"] > 0
            and r["bare_img_s"] > 0
            and r["ratio"] == pytest.approx(r["sslfuse_img_s"] / r["bare_img_s"], rel=0.01)
        )
