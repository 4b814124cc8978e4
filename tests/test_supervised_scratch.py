"""The ``supervised_scratch`` reference: it learns, it sees exactly the protocol's labeled images, it refuses bad
options."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
from conftest import sslfuse
from omegaconf import OmegaConf

import ssl_fusion.fusion.training as headtrain
from ssl_fusion.baselines.supervised_scratch import (
    SupervisedScratch,
    SupervisedScratchConfig,
    fit_selected,
    train_network,
)
from ssl_fusion.config import CONF_DIR, LabelsConfig, TrainOverrides, load_option
from ssl_fusion.data.datasets import ImageData
from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.data.splits import stratified_subset
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.protocol import fuse_once
from ssl_fusion.models.encoders import SmallCNNConfig
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.context import StageContext
from ssl_fusion.store.files import ArtifactStore

SHORT = SupervisedScratchConfig(name="supervised_scratch", steps=60, eval_every=20, batch_size=64)
TINY_RUN = ["preset=smoke", "labels.per_class=10", "encoder.widths=[4,8]", "dataset.image_size=8"]


def synthetic_context(data: ImageData, tmp_path) -> StageContext:
    encoder_cfg = SmallCNNConfig(name="small_cnn", widths=[8, 16, 32])
    return StageContext(
        SyntheticConfig(name="synthetic"),
        data,
        encoder_cfg,
        torch.device("cpu"),
        torch.float32,
        ArtifactStore(tmp_path),
        TrainOverrides(),
        0,
    )


def synthetic_data() -> ImageData:
    return make_synthetic(SyntheticConfig(name="synthetic"), root=None)


def test_it_learns_from_few_labeled_images(tmp_path):
    ctx = synthetic_context(synthetic_data(), tmp_path)
    result = SupervisedScratch(SHORT).evaluate(ctx, LabelsConfig(per_class=25), seed=0).to_record()
    assert result["method"] == "supervised_scratch[steps=60,eval_every=20,batch_size=64](small_cnn)"
    assert result["family"] == "supervised_scratch"
    assert result["options"] == {"steps": 60, "eval_every": 20, "batch_size": 64}
    assert result["pretexts"] == [] and not result["uses_test"] and not result["uses_all_labels"]
    assert result["n_labeled"] == 100 and result["regime"] == "25/class"
    assert result["final_loss"] < result["first_loss"]
    assert result["test_accuracy"] > 0.6, result["test_accuracy"]  # 4 classes: chance is 0.25
    assert result["selected_steps"] in (20, 40, 60)


def test_it_uses_exactly_the_labeled_images_of_the_protocol(tmp_path):
    data = synthetic_data()
    labels_cfg = LabelsConfig(fraction=0.2)
    result = SupervisedScratch(SHORT).evaluate(synthetic_context(data, tmp_path), labels_cfg, seed=1).to_record()

    features = FeatureSet(
        torch.randn(len(data.train_labels), 8),
        torch.randn(len(data.test_labels), 8),
        data.train_labels,
        data.test_labels,
    )
    head = fuse_once({"any": features}, load_option(FUSIONS, "concat"), labels_cfg, seed=1)
    assert (
        result["labeled_indices_sha256"] == head["labeled_indices_sha256"] and result["n_labeled"] == head["n_labeled"]
    )

    labeled = torch.zeros(len(data.train_labels), dtype=torch.bool)
    labeled[stratified_subset(data.train_labels, labels_cfg.fraction, None, seed=1)] = True
    inverted_unlabeled = torch.where(labeled[:, None, None, None], data.train_images, 255 - data.train_images)
    inverted = synthetic_context(dataclasses.replace(data, train_images=inverted_unlabeled), tmp_path)
    again = SupervisedScratch(SHORT).evaluate(inverted, labels_cfg, seed=1).to_record()
    for key in ("test_accuracy", "first_loss", "final_loss", "selected_steps", "val_accuracy"):
        assert again[key] == result[key], key


def test_yaml_lists_every_field_with_its_default():
    defaults = OmegaConf.to_container(OmegaConf.structured(SupervisedScratchConfig(name="supervised_scratch")))
    assert OmegaConf.to_container(OmegaConf.load(CONF_DIR / "fusion" / "supervised_scratch.yaml")) == defaults


@pytest.mark.parametrize(
    "key, value",
    [
        ("steps", 0),
        ("eval_every", 0),
        ("eval_every", 61),
        ("batch_size", 0),
        ("lr", 0.0),
        ("weight_decay", -1.0),
        ("max_shift", 0.5),
        ("val_fraction", 1.0),
    ],
)
def test_out_of_range_options_are_refused_by_key(key, value):
    with pytest.raises(UserError, match=rf"^fusion\.{key} must be "):
        SupervisedScratch(dataclasses.replace(SHORT, **{key: value}))


def test_one_labeled_image_per_class_leaves_nothing_to_train_on(tmp_path):
    with pytest.raises(UserError, match="none is left to train on"):
        SupervisedScratch(SHORT).evaluate(
            synthetic_context(synthetic_data(), tmp_path), LabelsConfig(per_class=1), seed=0
        )


@pytest.mark.slow
def test_bad_option_on_the_command_line_is_one_line(tmp_path):
    proc = sslfuse(
        "fuse", "preset=smoke", "fusion=supervised_scratch", "fusion.max_shift=0.7", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "fusion.max_shift must be in [0, 0.5)" in proc.stderr
    assert not (tmp_path / "outputs" / "artifacts").exists()


@pytest.mark.slow
def test_fuse_puts_it_in_the_report_beside_the_heads(tmp_path):
    sslfuse("run", *TINY_RUN, "pretexts=[random]", "fusions=[concat]", "seeds=[0]", "hydra.run.dir=run", cwd=tmp_path)
    # no cached features needed: an empty artifact store is enough
    sslfuse(
        "fuse",
        *TINY_RUN,
        "fusion=supervised_scratch",
        "fusion.steps=40",
        "fusion.eval_every=20",
        "artifacts_dir=empty",
        "hydra.run.dir=run/fuse/scratch",
        cwd=tmp_path,
    )
    records = {r["family"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "run").rglob("results.json"))}
    assert records["supervised_scratch"]["labeled_indices_sha256"] == records["concat"]["labeled_indices_sha256"]
    assert (
        records["supervised_scratch"]["selected_steps"] in (20, 40)
        and records["supervised_scratch"]["dataset"] == "synthetic"
    )
    sslfuse("report", "run", cwd=tmp_path)
    report = pd.read_csv(tmp_path / "run" / "report.csv")
    assert sorted(report["method"]) == ["concat(random)", "supervised_scratch[steps=40,eval_every=20](small_cnn)"]


def tiny_labeled() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (40, 1, 8, 8), dtype=torch.uint8, generator=generator)
    return images, torch.arange(40) % 4


TINY_ENCODER = SmallCNNConfig(name="small_cnn", widths=[4, 8])


def recorded_learning_rates(monkeypatch) -> list[float]:
    """The learning rate of every AdamW step taken while the test runs, in order."""
    rates: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return rates


def test_the_refit_retraces_the_learning_rates_of_the_selection_run(monkeypatch):
    cfg = dataclasses.replace(SHORT, steps=9, eval_every=3, batch_size=8)
    scores = iter([(0.9, 0.1), (0.5, 0.5), (0.4, 0.6)])  # validation picks the first evaluation: step 3 of 9
    monkeypatch.setattr(headtrain, "score", lambda probs, labels: next(scores))
    rates = recorded_learning_rates(monkeypatch)
    _, selection, losses = fit_selected(
        cfg, TINY_ENCODER, *tiny_labeled(), 4, torch.device("cpu"), torch.float32, seed=0
    )
    assert selection.steps == 3 and len(losses) == 3 and len(rates) == 9 + 3
    selection_rates, refit_rates = rates[:9], rates[9:]
    assert refit_rates == selection_rates[:3]
    assert selection_rates[0] == cfg.lr and selection_rates == sorted(selection_rates, reverse=True)


@pytest.mark.parametrize("dtype, scaled", [(torch.float16, True), (torch.float32, False)])
def test_only_fp16_training_scales_its_loss(monkeypatch, dtype, scaled):
    made = []

    class RecordingScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.scaled = 0
            made.append(self)

        def scale(self, outputs):
            self.scaled += 1
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    cfg = dataclasses.replace(SHORT, steps=3, eval_every=3, batch_size=8)
    _, losses = train_network(cfg, TINY_ENCODER, *tiny_labeled(), 4, 3, torch.device("cpu"), dtype, seed=0)
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    assert [scaler.scaled for scaler in made if scaler.is_enabled()] == ([3] if scaled else [])
