"""scripts/gpu_check.sh: refused in one line without a CUDA device; its CPU dry run writes the table. Its GPU-only
parts are tested on the CPU with torch.cuda's calls replaced: the timers synchronise, the host syncs are counted per
step, and the reference training loop is the rotation recipe written out, not sslfuse's pretext."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import REPO

from ssl_fusion.config import TrainOverrides
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import Pretext
from ssl_fusion.pretexts.rotation import Rotation
from ssl_fusion.store.artifacts import pretext_recipe

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


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
    assert "| stage | sslfuse img/s | plain loop img/s | ratio | steps/s (sslfuse / plain) |" in table
    assert table in proc.stdout
    rows = json.loads((tmp_path / "out/gpu_check.json").read_text())["rows"]
    assert [r["stage"].split(" (")[0] for r in rows] == [
        "pretrain rotation",
        "cache rotation",
        "cache external resnet50 at 32 px",
    ]
    for r in rows:
        assert (
            r["sslfuse_img_s"] > 0
            and r["bare_img_s"] > 0
            and r["ratio"] == pytest.approx(r["sslfuse_img_s"] / r["bare_img_s"], rel=0.01)
            and r["sslfuse_steps_s"] > 0
            and r["bare_steps_s"] > 0
            and math.isfinite(r["bare_checksum"])
        )
        # no GPU: no syncs to count and no GPU memory
        assert r["bare_syncs_per_step"] is r["sslfuse_syncs_per_step"] is r["bare_peak_gib"] is None


@pytest.mark.parametrize("device, expected", [(CUDA, ["sync", "work", "sync"]), (CPU, ["work"])])
def test_the_timer_waits_for_the_gpu_at_both_ends(monkeypatch, device, expected):
    """CUDA runs kernels asynchronously: a timed region starts and ends with a synchronize, else it times launches."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    with gpu_check.Stopwatch(device) as timer:
        events.append("work")
    assert events == expected and timer.seconds >= 0


def test_host_syncs_are_counted_per_step(monkeypatch):
    """Known truth: a run of n steps that syncs 3 times a step and 5 times once (and warns of something else) makes
    3 syncs a step; the debug mode is set for each count and set back."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def run(steps: int) -> None:
        warnings.warn("an unrelated warning")
        for _ in range(3 * steps + 5):
            warnings.warn(f"{gpu_check.SYNC_WARNING} cudaStreamSynchronize")

    assert gpu_check.syncs_per_step(run, 4, CUDA) == 3.0
    assert modes == ["warn", "default", "warn", "default"]
    modes.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert gpu_check.syncs_per_step(run, 4, CPU) is None and modes == []


def test_the_plain_loss_is_the_rotation_recipe_written_out():
    """Paired comparison: with the same weights and random draws, the plain loop's loss is the rotation pretext's, so
    the ratio compares the same work."""
    recipe = pretext_recipe("rotation", TrainOverrides())
    torch.manual_seed(0)
    pretext = Rotation(recipe, build_encoder(SmallCNNConfig(name="small_cnn"), 1))
    plain = gpu_check.PlainRotation(pretext.encoder, recipe.head_hidden)
    plain.head = pretext.head
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    ours = pretext.loss(images, torch.zeros(8, dtype=torch.long))
    torch.manual_seed(2)
    torch.testing.assert_close(plain.loss(images, recipe.max_shift), ours)


def test_the_plain_training_loop_does_not_call_the_pretexts_loss(monkeypatch):
    def refused(*args):
        raise AssertionError("the plain loop called sslfuse's pretext")

    monkeypatch.setattr(Rotation, "loss", refused)
    monkeypatch.setattr(Pretext, "loss", refused)
    recipe = pretext_recipe("rotation", TrainOverrides(batch_size=8))
    images = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8)
    sizes = {"warmup_steps": 1, "bare_steps": 2, "sync_steps": 1}
    measured = gpu_check.plain_training(images, SmallCNNConfig(name="small_cnn"), recipe, sizes, CPU, torch.float32)
    assert measured["images_per_second"] > 0
    assert math.isfinite(measured["checksum"]) and measured["checksum"] > 0  # every loss kept (cross-entropies)


def test_plain_inference_keeps_every_output():
    """Known truth: the checksum is the sum of every feature the timed loop computed, so none is thrown away."""
    torch.manual_seed(0)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn"), 1).eval()
    batches = [torch.rand(4, 1, 16, 16) for _ in range(3)]
    measured = gpu_check.plain_inference(encoder, batches, CPU, torch.float32)
    with torch.no_grad():
        expected = sum(float(encoder(batch).sum()) for batch in batches)
    assert measured["checksum"] == pytest.approx(expected, rel=1e-5) and measured["images_per_second"] > 0
