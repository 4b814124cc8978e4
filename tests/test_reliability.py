"""Crashes lose nothing, concurrent jobs do not collide, damaged artifacts are never used."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import sslfuse
from ssl_fusion.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.errors import UserError
from ssl_fusion.pretexts import Pretext, PretextConfig
from ssl_fusion.trainer import train_pretext

SLOW_SMOKE = [
    "pretrain", "preset=smoke", "pretext=rotation", "precision=fp32", "deterministic=true", "dataset.n_train=2048", "train.batch_size=128",
    "train.epochs=4", "train.max_steps_per_epoch=null",
]


def encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    (path,) = (folder / "outputs" / "artifacts" / "encoders").glob("rotation-*/encoder.pt")
    return torch.load(path, weights_only=True)


def test_sigkilled_pretraining_resumes_to_the_same_encoder(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir(), reference.mkdir()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ssl_fusion.cli", *SLOW_SMOKE, "hydra.run.dir=a"], cwd=killed, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed / "outputs" / "artifacts" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*/last.pt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "pretraining ended before it could be killed"
    assert not list((killed / "outputs" / "artifacts").glob("encoders/rotation-*/manifest.json"))

    resumed = sslfuse(*SLOW_SMOKE, "hydra.run.dir=b", cwd=killed)
    assert "resuming rotation from checkpoint" in resumed.stdout + resumed.stderr
    sslfuse(*SLOW_SMOKE, "hydra.run.dir=c", cwd=reference)
    resumed_state, reference_state = encoder_state(killed), encoder_state(reference)
    assert resumed_state.keys() == reference_state.keys()
    for key in reference_state:
        assert torch.equal(resumed_state[key], reference_state[key]), key
    assert not list(checkpoints.glob("*/last.pt")), "the checkpoint is removed once the encoder is stored"


def test_two_jobs_needing_one_encoder_build_it_once(tmp_path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    jobs = [
        subprocess.Popen([sys.executable, "-m", "ssl_fusion.cli", "pretrain", "preset=smoke", "pretext=simclr", f"hydra.run.dir=job{i}"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], logs
    assert sum("pretraining encoder" in log for log in logs) == 1 and sum("reused encoder" in log for log in logs) == 1
    assert len(list((tmp_path / "outputs" / "artifacts" / "encoders").glob("simclr-*/manifest.json"))) == 1
    assert not list((tmp_path / "outputs" / "artifacts" / "encoders").glob(".staging-*"))


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
