"""Pretraining's per-epoch history: the trainer's ``on_epoch`` hook sees every epoch it trains (and, after a resume,
the epochs after it), probes during pretraining leave the trained weights as they are, and the stored encoder holds
its history in its manifest and a plot of it beside."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import ssl_fusion.stages  # noqa: F401  (registers the stage schemas)
from ssl_fusion.config import CONF_DIR, ProbeConfig, TrainOverrides
from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.models.encoders import SmallCNNConfig
from ssl_fusion.pretexts import trainer
from ssl_fusion.pretexts.rotation import Rotation
from ssl_fusion.report.curves import plot_pretraining
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.context import StageContext, open_context
from ssl_fusion.stages.pretrain import CURVE, History, ensure_encoder, train_encoder
from ssl_fusion.store.artifacts import ENCODERS_KIND, pretext_recipe
from ssl_fusion.store.files import ArtifactStore

EPOCHS = 3
PROBE = ProbeConfig(max_train=32, max_test=16)


class Killed(Exception):
    """Stands for the process being killed in the middle of a step."""


def context(tmp_path: Path, store: str = "store", **overrides) -> StageContext:
    """Rotation of small_cnn on 48 synthetic 12-pixel images: epochs of 3 steps of 8 images."""
    return StageContext(
        data=make_synthetic(SyntheticConfig(name="synthetic", n_train=48, n_test=16, image_size=12), tmp_path),
        dataset_cfg=SyntheticConfig(name="synthetic"),
        encoder_cfg=SmallCNNConfig(name="small_cnn"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        store=ArtifactStore(tmp_path / store),
        overrides=TrainOverrides(max_steps_per_epoch=3, **overrides),
        seed=0,
    )


def recipe():
    return dataclasses.replace(pretext_recipe("rotation", TrainOverrides()), batch_size=8, epochs=EPOCHS)


def test_the_hook_sees_each_epoch_with_the_results_loss_and_after_a_resume_the_epochs_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An uninterrupted run: one record per epoch, numbered from 1, its losses those of ``TrainResult``. A run killed
    in epoch 2 after a checkpoint mid-epoch: its hook saw epoch 1; resumed, the hook sees epochs 2 and 3, with the
    losses of the uninterrupted run."""
    whole = History(PROBE)
    _, result = train_encoder(context(tmp_path, "whole"), recipe(), "rotation-test", whole)
    assert [entry["epoch"] for entry in whole.entries] == [1, 2, 3]
    assert [entry["loss"] for entry in whole.entries] == result.epoch_losses
    assert all(entry["images_per_second"] > 0 and entry["seconds"] > 0 for entry in whole.entries)

    killed, resumed = History(PROBE), History(PROBE)
    ctx = context(tmp_path, checkpoint_every_steps=2)  # the run's 4th step (epoch 2, step 1) is checkpointed
    loss, calls = Rotation.loss, []

    def dies_at_step_five(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        return loss(self, images, labels)

    with monkeypatch.context() as patch:
        patch.setattr(Rotation, "loss", dies_at_step_five)
        with pytest.raises(Killed):
            train_encoder(ctx, recipe(), "rotation-test", killed)
    assert [entry["epoch"] for entry in killed.entries] == [1]
    _, after = train_encoder(ctx, recipe(), "rotation-test", resumed)
    assert (after.resumed_at_epoch, after.resumed_at_step) == (1, 1)
    assert after.epoch_losses == result.epoch_losses
    assert [entry["epoch"] for entry in resumed.entries] == [2, 3]
    assert [entry["loss"] for entry in resumed.entries] == after.epoch_losses[1:]
    history = resumed.manifest(after.epoch_losses, {"knn_accuracy": 0.5, "linear_accuracy": 0.25})
    assert history[0] == {"epoch": 1, "loss": after.epoch_losses[0]}  # trained before the resume: its loss only
    assert (history[-1]["knn_accuracy"], history[-1]["linear_accuracy"]) == (0.5, 0.25)


def test_probing_every_epoch_or_drawing_random_numbers_in_the_hook_leaves_the_trained_weights_as_they_are(
    tmp_path: Path,
) -> None:
    """Paired runs, same seed: without per-epoch probes, with a probe after every epoch, and with a hook that draws
    random numbers and leaves the model in eval mode. Rotation draws its rotations from the global RNG, so a hook
    that moved that stream or left batch norm in eval mode would change the weights."""
    plain, _ = train_encoder(context(tmp_path, "plain"), recipe(), "rotation-test")
    probed = History(dataclasses.replace(PROBE, every_epochs=1))
    encoder, _ = train_encoder(context(tmp_path, "probed"), recipe(), "rotation-test", probed)
    assert [("knn_accuracy" in entry) for entry in probed.entries] == [True, True, False]  # the last: probed at the end
    for key, value in plain.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key

    def meddling(ctx: StageContext, encoder: torch.nn.Module, *_) -> Callable[[trainer.EpochRecord], None]:
        def on_epoch(record: trainer.EpochRecord) -> None:
            torch.rand(100)
            encoder.eval()

        return on_epoch

    meddled = History(PROBE)
    meddled.hook = meddling  # the stage hands the trainer this hook instead of the history's own
    encoder, _ = train_encoder(context(tmp_path, "meddled"), recipe(), "rotation-test", meddled)
    for key, value in plain.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key


@pytest.mark.slow
def test_the_stored_encoder_has_its_history_in_its_manifest_and_its_curve_beside_it(tmp_path: Path) -> None:
    """Probes every 2 of 3 epochs: the manifest's history has the 3 epochs' losses, throughput and times, probe
    scores after epoch 2 and the final ones on epoch 3; the curve is a PNG listed (hashed) in the manifest."""
    ctx = context(tmp_path)
    name, manifest, reused = ensure_encoder(ctx, recipe(), dataclasses.replace(PROBE, every_epochs=2))
    assert not reused
    history, metrics = manifest["metrics"]["history"], manifest["metrics"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert [entry["loss"] for entry in history] == metrics["epoch_losses"]
    assert all(entry["images_per_second"] > 0 and entry["seconds"] > 0 for entry in history)
    assert ["knn_accuracy" in entry for entry in history] == [False, True, True]
    assert (history[2]["knn_accuracy"], history[2]["linear_accuracy"]) == (
        metrics["knn_accuracy"],
        metrics["linear_accuracy"],
    )
    assert CURVE in manifest["files"]
    with Image.open(ctx.store.folder(ENCODERS_KIND, name) / CURVE) as image:
        assert image.format == "PNG"
        image.verify()
    assert ctx.store.manifest(ENCODERS_KIND, name) == manifest  # the curve's hash checks


def test_the_curve_plots_every_epochs_loss_and_each_probe_where_it_was_measured() -> None:
    history = [
        {"epoch": 1, "loss": 2.0},
        {"epoch": 2, "loss": 1.5, "knn_accuracy": 0.4, "linear_accuracy": 0.5},
        {"epoch": 3, "loss": 1.2},
        {"epoch": 4, "loss": 1.1, "knn_accuracy": 0.6, "linear_accuracy": 0.7},
    ]
    figure = plot_pretraining(history, "rotation-test")
    loss_axis, probe_axis = figure.axes
    (loss,) = loss_axis.get_lines()
    assert list(loss.get_xdata()) == [1, 2, 3, 4] and list(loss.get_ydata()) == [2.0, 1.5, 1.2, 1.1]
    knn, linear = probe_axis.get_lines()
    assert list(knn.get_xdata()) == [2, 4] and list(knn.get_ydata()) == pytest.approx([40, 60])
    assert list(linear.get_xdata()) == [2, 4] and list(linear.get_ydata()) == pytest.approx([50, 70])


def test_a_negative_probe_interval_is_refused_in_one_line() -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="pretrain", overrides=["preset=smoke", "probe.every_epochs=-1"])
    with pytest.raises(UserError) as refused:
        open_context(cfg, 0)
    assert str(refused.value) == "probe.every_epochs must be >= 0 (0: probe only once pretrained), got -1"
