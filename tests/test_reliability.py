"""Crashes lose nothing, concurrent jobs do not collide, damaged artifacts are never used."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from conftest import kill_at_first_checkpoint, sslfuse, stored_encoder_state

from ssl_fusion.evaluation.result import FuseResult
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import Pretext, PretextConfig
from ssl_fusion.pretexts.trainer import train_pretext
from ssl_fusion.report.tables import write_report
from ssl_fusion.runtime.errors import UserError

SLOW_SMOKE = [
    "pretrain",
    "preset=smoke",
    "pretext=rotation",
    "precision=fp32",
    "deterministic=true",
    "dataset.n_train=2048",
    "train.batch_size=128",
    "train.epochs=4",
    "train.max_steps_per_epoch=null",
]


@pytest.mark.slow
def test_sigkilled_pretraining_resumes_to_the_same_encoder(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir(), reference.mkdir()
    kill_at_first_checkpoint([*SLOW_SMOKE, "hydra.run.dir=a"], killed, poll_seconds=0.05)
    assert not list((killed / "outputs" / "artifacts").glob("encoders/rotation-*/manifest.json"))

    resumed = sslfuse(*SLOW_SMOKE, "hydra.run.dir=b", cwd=killed)
    assert "resuming rotation from checkpoint" in resumed.stdout + resumed.stderr
    sslfuse(*SLOW_SMOKE, "hydra.run.dir=c", cwd=reference)
    resumed_state, reference_state = stored_encoder_state(killed), stored_encoder_state(reference)
    assert resumed_state.keys() == reference_state.keys()
    for key in reference_state:
        assert torch.equal(resumed_state[key], reference_state[key]), key
    assert not list((killed / "outputs" / "artifacts" / "checkpoints").glob("*/last.pt")), (
        "the checkpoint is removed once the encoder is stored"
    )


@pytest.mark.slow
def test_two_jobs_needing_one_encoder_build_it_once(tmp_path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ssl_fusion.cli",
                "pretrain",
                "preset=smoke",
                "pretext=simclr",
                f"hydra.run.dir=job{i}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], logs
    assert sum("pretraining encoder" in log for log in logs) == 1 and sum("reused encoder" in log for log in logs) == 1
    assert len(list((tmp_path / "outputs" / "artifacts" / "encoders").glob("simclr-*/manifest.json"))) == 1
    assert not list((tmp_path / "outputs" / "artifacts" / "encoders").glob(".staging-*"))


@pytest.mark.slow
def test_corrupted_encoder_is_refused_by_name(tmp_path):
    sslfuse("pretrain", "preset=smoke", "pretext=random", "hydra.run.dir=p", cwd=tmp_path)
    (weights,) = (tmp_path / "outputs" / "artifacts" / "encoders").glob("random-*/encoder.pt")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = sslfuse("cache", "preset=smoke", "pretexts=[random]", "hydra.run.dir=c", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "encoder.pt" in proc.stderr and "corrupted" in proc.stderr
    assert "Traceback" not in proc.stderr


class DivergesInSecondEpoch(Pretext):
    """A pretext whose loss becomes NaN after the first epoch's steps."""

    def __init__(self, cfg: PretextConfig, encoder) -> None:
        super().__init__(cfg, encoder)
        self.calls = 0

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        value = self.encoder(images).float().pow(2).mean()
        return value * float("nan") if self.calls > 2 else value


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn", widths=[4, 4, 4, 8]), channels=1)
    model = DivergesInSecondEpoch(PretextConfig(name="diverging", epochs=3, batch_size=8), encoder)
    images, labels = torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8), torch.zeros(16, dtype=torch.long)
    checkpoint = tmp_path / "last.pt"
    with pytest.raises(UserError, match=r"loss is nan at epoch 2 step 2.*last good checkpoint"):
        train_pretext(model, images, labels, model.cfg, torch.device("cpu"), torch.float32, 0, checkpoint)
    assert len(torch.load(checkpoint, weights_only=True)["epoch_losses"]) == 1


def test_a_crash_while_plotting_leaves_the_previous_plot_whole(tmp_path, monkeypatch):
    for seed in (0, 1):
        record = FuseResult(
            method="concat(a+b)",
            title="concat",
            family="concat",
            options={},
            pretexts=["a", "b"],
            labels={"regime": "1%", "seed": seed},
            metrics={"test_accuracy": 0.8 + seed / 100},
        ).to_record()
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(record))
    write_report(tmp_path)
    plot = tmp_path / "accuracy_vs_labels.png"
    before = plot.read_bytes()

    def write_half_then_fail(figure, target, **kwargs):
        if hasattr(target, "write"):
            target.write(before[: len(before) // 2])
        else:
            Path(target).write_bytes(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path)
    assert plot.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_user_error_in_a_later_multirun_job_is_one_line_and_keeps_earlier_results(tmp_path):
    proc = sslfuse(
        "fuse",
        "-m",
        "preset=smoke",
        "fusion=supervised_scratch",
        "fusion.steps=4",
        "fusion.eval_every=2",
        "encoder.widths=[4,8]",
        "dataset.image_size=8",
        "labels.per_class=10,1000",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "labels.per_class must be in [1, 256]" in proc.stderr
    assert [p.parent.name for p in (tmp_path / "sweep").rglob("results.json")] == ["0"]


@pytest.mark.slow
def test_a_bad_value_in_a_sweep_is_refused_in_one_line_before_any_job(tmp_path):
    proc = sslfuse(
        "fuse",
        "-m",
        "preset=smoke",
        "fusion=attention,atention",
        "seed=0,1",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Could not find 'fusion/atention'" in proc.stderr and "supervised_scratch" in proc.stderr
    assert not (tmp_path / "sweep").exists()


class SquaredFeatures(Pretext):
    """A minimal pretext: the mean squared feature."""

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).float().pow(2).mean()


def tiny_pretext(epochs: int) -> SquaredFeatures:
    torch.manual_seed(0)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn", widths=[4, 4, 4, 8]), channels=1)
    return SquaredFeatures(PretextConfig(name="squared", epochs=epochs, batch_size=8), encoder)


def tiny_images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8, generator=generator), torch.zeros(
        16, dtype=torch.long
    )


@pytest.fixture
def recording_scalers(monkeypatch) -> list:
    """Every ``torch.amp.GradScaler`` made while the test runs, each with the list of its calls."""
    made = []

    class RecordingScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.calls = []
            made.append(self)

        def scale(self, outputs):
            self.calls.append("scale")
            return super().scale(outputs)

        def step(self, optimizer, *args, **kwargs):
            self.calls.append("step")
            return super().step(optimizer, *args, **kwargs)

        def update(self, new_scale=None):
            self.calls.append("update")
            return super().update(new_scale)

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    return made


@pytest.mark.parametrize("dtype, scaled", [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)])
def test_only_fp16_pretraining_scales_its_loss(tmp_path, recording_scalers, dtype, scaled):
    model = tiny_pretext(epochs=1)
    checkpoint = tmp_path / "last.pt"
    result = train_pretext(model, *tiny_images(), model.cfg, torch.device("cpu"), dtype, 0, checkpoint)
    assert all(map(math.isfinite, result.epoch_losses))
    enabled = [scaler for scaler in recording_scalers if scaler.is_enabled()]
    if not scaled:
        assert enabled == []
        return
    (scaler,) = enabled
    assert scaler.calls == ["scale", "step", "update"] * 2  # 16 images, batches of 8
    assert torch.load(checkpoint, weights_only=True)["scaler"]["scale"] == scaler.get_scale()


@pytest.fixture
def fake_cuda_rng(monkeypatch) -> list:
    """CUDA reported present with one device whose RNG state is a known tensor; returns the states set.
    The optimizer is told there is no accelerator, so that its CUDA-graph check does not start CUDA."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.arange(16, dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    return restored


def test_checkpoints_keep_and_restore_the_cuda_rng_state(tmp_path, fake_cuda_rng):
    checkpoint = tmp_path / "last.pt"
    model = tiny_pretext(epochs=1)
    train_pretext(model, *tiny_images(), model.cfg, torch.device("cpu"), torch.float32, 0, checkpoint)
    (saved,) = torch.load(checkpoint, weights_only=True)["cuda_rng"]
    assert torch.equal(saved, torch.arange(16, dtype=torch.uint8))

    model = tiny_pretext(epochs=2)
    result = train_pretext(model, *tiny_images(), model.cfg, torch.device("cpu"), torch.float32, 0, checkpoint)
    assert result.resumed_at_epoch == 1
    assert len(fake_cuda_rng) == 1 and torch.equal(fake_cuda_rng[0][0], saved)


def test_a_checkpoint_from_before_cuda_rng_and_loss_scaling_still_resumes(tmp_path, fake_cuda_rng):
    checkpoint = tmp_path / "last.pt"
    model = tiny_pretext(epochs=1)
    train_pretext(model, *tiny_images(), model.cfg, torch.device("cpu"), torch.float32, 0, checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    old = {key: state[key] for key in ("model", "optimizer", "scheduler", "rng", "epoch_losses")}
    torch.save(old, checkpoint)

    model = tiny_pretext(epochs=2)
    result = train_pretext(model, *tiny_images(), model.cfg, torch.device("cpu"), torch.float32, 0, checkpoint)
    assert result.resumed_at_epoch == 1 and len(result.epoch_losses) == 2
    assert fake_cuda_rng == []
