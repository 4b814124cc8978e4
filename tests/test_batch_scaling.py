"""The global batch and learning rate under torchrun: ``train.batch_size_per_device`` makes the global batch grow with
the number of processes (so an epoch takes fewer steps) and the learning rate follow it by ``train.lr_scaling``; the
default keeps the recipe's batch as the global one, split over the processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ssl_fusion.config import TrainOverrides
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import Pretext, PretextConfig
from ssl_fusion.pretexts.trainer import train_pretext
from ssl_fusion.runtime import distributed
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.store.artifacts import pretext_recipe

RECIPE_BATCH, RECIPE_LR = 256, 2e-3  # conf/pretext/simclr.yaml


@pytest.fixture
def processes(monkeypatch):
    """Pretend to be rank 0 of ``n`` torchrun processes (without a process group): torchrun's WORLD_SIZE for the
    config, and the world size the trainer splits the global batch by."""

    def pretend(n: int) -> None:
        monkeypatch.setenv("WORLD_SIZE", str(n))
        monkeypatch.setattr(distributed, "world_size", lambda: n)

    return pretend


def test_the_simclr_recipe_is_the_reference():
    recipe = pretext_recipe("simclr", TrainOverrides())
    assert (recipe.batch_size, recipe.lr) == (RECIPE_BATCH, RECIPE_LR)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_per_device_batch_makes_the_global_batch_grow(processes, n):
    processes(n)
    recipe = pretext_recipe("simclr", TrainOverrides(batch_size_per_device=64))
    assert recipe.batch_size == 64 * n
    assert distributed.local_batch_size(recipe.batch_size) == 64


@pytest.mark.parametrize("n", [1, 2, 8])
def test_by_default_the_recipe_batch_is_global_and_split(processes, n):
    processes(n)
    recipe = pretext_recipe("simclr", TrainOverrides())
    assert (recipe.batch_size, recipe.lr) == (RECIPE_BATCH, RECIPE_LR), "no process count changes the recipe"
    assert distributed.local_batch_size(recipe.batch_size) == RECIPE_BATCH // n


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize(
    ("rule", "factor"), [("sqrt", math.sqrt), ("linear", lambda ratio: ratio), ("none", lambda ratio: 1.0)]
)
def test_the_learning_rate_follows_the_global_batch_by_the_rule(processes, n, rule, factor):
    processes(n)
    recipe = pretext_recipe("simclr", TrainOverrides(batch_size_per_device=64, lr_scaling=rule))
    assert recipe.lr == pytest.approx(RECIPE_LR * factor(64 * n / RECIPE_BATCH), rel=1e-12)


def test_the_recipe_batch_keeps_the_recipe_lr_under_every_rule(processes):
    """8 processes of 32 make the recipe's own batch: its learning rate, exactly, whatever the rule."""
    processes(8)
    for rule in ("sqrt", "linear", "none"):
        assert pretext_recipe("simclr", TrainOverrides(batch_size_per_device=32, lr_scaling=rule)).lr == RECIPE_LR


def test_one_process_names_the_same_recipe_with_the_global_batch(processes):
    """What 8 processes of 64 pretrain, one process (fuse, run) finds with train.batch_size=512: the same recipe, so
    the same encoder key."""
    processes(8)
    eight = pretext_recipe("simclr", TrainOverrides(batch_size_per_device=64))
    processes(1)
    assert pretext_recipe("simclr", TrainOverrides(batch_size=512)) == eight


def test_a_global_and_a_per_device_batch_together_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"^train.batch_size_per_device must be > 0 with train.batch_size null"):
        TrainOverrides(batch_size=256, batch_size_per_device=32)


class RecordsBatches(Pretext):
    """A minimal pretext that records the size of every batch it is given."""

    sizes: list[int]

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(images))
        return self.encoder(images).float().pow(2).mean()


@pytest.mark.parametrize("n", [1, 2, 8])
def test_the_trainer_takes_per_device_batches_and_fewer_steps(processes, tmp_path: Path, n):
    """Rank 0 of n processes with 4 images per device: global batch 4n, so 64 images make 64 / 4n steps of 4."""
    processes(n)
    recipe = pretext_recipe("rotation", TrainOverrides(batch_size_per_device=4, epochs=1))
    torch.manual_seed(0)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn", widths=[4, 4, 4, 8]), channels=1)
    model = RecordsBatches(PretextConfig(name="records", batch_size=recipe.batch_size), encoder)
    model.sizes = []
    images = torch.randint(0, 255, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = train_pretext(
        model, images, torch.zeros(64), recipe, torch.device("cpu"), torch.float32, 0, tmp_path / "last.pt"
    )
    assert model.sizes == [4] * (64 // (4 * n))
    assert result.batch_per_process == 4
