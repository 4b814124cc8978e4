"""Pretraining checkpoints within an epoch, on a step or a time interval; a run stopped after such a checkpoint
resumes at that step, in the same seeded order and with the same RNG, optimizer and scheduler states, to exactly the
weights of an uninterrupted run: with images in memory and with an image folder streamed from disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import kill_at_first_checkpoint, sslfuse, stored_encoder_state
from test_streaming import open_folder, write_folder

from ssl_fusion.config import TrainOverrides
from ssl_fusion.data.datasets import ImageData
from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.models.encoders import SmallCNNConfig
from ssl_fusion.pretexts import trainer
from ssl_fusion.pretexts.rotation import Rotation
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.pretrain import train_encoder
from ssl_fusion.store.artifacts import pretext_recipe
from ssl_fusion.store.files import ArtifactStore

NAME = "rotation-test"
STEPS_PER_EPOCH = 6  # steps of 8 images (of 48 or more)
KILLED_AT = 10  # the run's 10th step (epoch 2, step 4) fails; the last checkpoint is after step 8 (epoch 2, step 2)


class Killed(Exception):
    """Stands for the process being killed in the middle of a step."""


def synthetic(tmp_path: Path) -> ImageData:
    return make_synthetic(SyntheticConfig(name="synthetic", n_train=48, n_test=8, image_size=12), tmp_path)


def streamed(tmp_path: Path) -> ImageData:
    write_folder(tmp_path / "images", total=64)  # 51 train images
    return open_folder(tmp_path / "images")


def pretrain(data: ImageData, store: Path, **overrides) -> tuple[dict[str, torch.Tensor], trainer.TrainResult]:
    """Two epochs of rotation on ``data`` with small_cnn through the stage's training function."""
    recipe = dataclasses.replace(pretext_recipe("rotation", TrainOverrides()), batch_size=8, epochs=2)
    ctx = StageContext(
        data=data,
        dataset_cfg=SyntheticConfig(name="synthetic"),
        encoder_cfg=SmallCNNConfig(name="small_cnn"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        store=ArtifactStore(store),
        overrides=TrainOverrides(max_steps_per_epoch=STEPS_PER_EPOCH, **overrides),
        seed=0,
    )
    encoder, result = train_encoder(ctx, recipe, NAME)
    return encoder.state_dict(), result


def kill_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The rotation loss of the ``step``-th step of the run raises ``Killed``."""
    loss, calls = Rotation.loss, []

    def counted(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == step:
            raise Killed
        return loss(self, images, labels)

    monkeypatch.setattr(Rotation, "loss", counted)


def assert_same_weights(resumed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


@pytest.mark.parametrize(
    "source, num_workers", [(synthetic, 0), (streamed, 0), (streamed, 2)], ids=["memory", "folder", "folder-2-workers"]
)
def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: Callable[[Path], ImageData], num_workers: int
) -> None:
    data = source(tmp_path)
    reference, uninterrupted = pretrain(data, tmp_path / "reference", num_workers=num_workers)
    with monkeypatch.context() as patch:
        kill_at_step(patch, KILLED_AT)
        with pytest.raises(Killed):
            pretrain(data, tmp_path / "store", num_workers=num_workers, checkpoint_every_steps=4)
    checkpoint = torch.load(tmp_path / "store" / "checkpoints" / NAME / "last.pt", weights_only=True)
    assert (len(checkpoint["epoch_losses"]), checkpoint["step"]) == (1, 2), "the last checkpoint is mid-epoch"

    resumed, result = pretrain(data, tmp_path / "store", num_workers=num_workers, checkpoint_every_steps=4)
    assert (result.resumed_at_epoch, result.resumed_at_step) == (1, 2)
    assert result.images_seen == (STEPS_PER_EPOCH - 2) * 8
    assert result.epoch_losses == uninterrupted.epoch_losses
    assert_same_weights(resumed, reference)


def test_a_time_interval_checkpoints_within_the_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a time interval shorter than a step, a checkpoint follows every step of an epoch but its last (then the
    epoch's own); with 0 minutes, only epoch ends are checkpointed."""
    saved: list[tuple[int, int]] = []
    save = trainer.save_checkpoint
    monkeypatch.setattr(
        trainer,
        "save_checkpoint",
        lambda path, state: (saved.append((len(state["epoch_losses"]), state["step"])), save(path, state)),
    )
    data = synthetic(tmp_path)
    pretrain(data, tmp_path / "often", checkpoint_every_minutes=1e-9)
    every_step = [(epoch, step) for epoch in range(2) for step in range(1, STEPS_PER_EPOCH)]
    assert saved == sorted(every_step + [(1, 0), (2, 0)])
    saved.clear()
    pretrain(data, tmp_path / "epochs", checkpoint_every_minutes=0)
    assert saved == [(1, 0), (2, 0)]


SMOKE = [
    "pretrain",
    "preset=smoke",
    "pretext=rotation",
    "precision=fp32",
    "deterministic=true",
    "dataset.n_train=2048",
    "train.batch_size=16",
    "train.max_steps_per_epoch=null",
    "train.checkpoint_every_steps=2",
]


@pytest.mark.slow
def test_the_cli_killed_mid_epoch_resumes_to_the_same_encoder(tmp_path: Path) -> None:
    """``sslfuse pretrain`` SIGKILLed once a mid-epoch checkpoint exists resumes at its step and stores the encoder
    of an uninterrupted run."""
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir(), reference.mkdir()
    kill_at_first_checkpoint([*SMOKE, "hydra.run.dir=a"], killed, poll_seconds=0.02)

    resumed = sslfuse(*SMOKE, "hydra.run.dir=b", cwd=killed)
    assert "after epoch 0 step" in resumed.stdout + resumed.stderr
    sslfuse(*SMOKE, "hydra.run.dir=c", cwd=reference)
    assert_same_weights(stored_encoder_state(killed), stored_encoder_state(reference))
