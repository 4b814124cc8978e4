"""scripts/reference/logreg_concat.py: LogisticRegressionCV on the concatenated cached features reads the labeled
subsets `sslfuse fuse` draws and writes results.json files `sslfuse report` tables beside the heads."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
import torch
from conftest import REPO, sslfuse

from ssl_fusion.config import LabelsConfig
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.protocol import fuse_once
from ssl_fusion.stages.context import open_context
from ssl_fusion.store.artifacts import (
    FEATURES_KIND,
    encoder_artifact,
    features_artifact,
    load_features,
    pretext_recipe,
)

spec = importlib.util.spec_from_file_location("logreg_concat", REPO / "scripts/reference/logreg_concat.py")
logreg_concat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(logreg_concat)

DATA = ["dataset=synthetic", "dataset.n_train=200", "dataset.n_test=100", "dataset.image_size=16", "device=cpu"]


def cache_features(tmp_path) -> list[str]:
    """Publish tiny cached features for rotation (class means apart: separable) and simclr (noise) under the keys
    `sslfuse fuse` looks up for these overrides; the overrides that find them."""
    overrides = [*DATA, f"artifacts_dir={tmp_path / 'store'}", "pretexts=[rotation,simclr]"]
    ctx = open_context(logreg_concat.fuse_config(overrides), 0)
    generator = np.random.default_rng(0)
    for pretext, width in (("rotation", 8), ("simclr", 5)):
        name = features_artifact(
            ctx, encoder_artifact(ctx, pretext_recipe(pretext, ctx.overrides), ctx.overrides.max_steps_per_epoch)
        )
        with ctx.store.staging(FEATURES_KIND, name) as scratch:
            for split, labels in (("train", ctx.data.train_labels), ("test", ctx.data.test_labels)):
                rows = generator.normal(size=(len(labels), width)).astype(np.float16)
                if pretext == "rotation":
                    rows[np.arange(len(labels)), labels.numpy()] += 8
                np.save(scratch / f"{split}.npy", rows)
                np.save(scratch / f"{split}_labels.npy", labels.numpy())
            ctx.store.publish(FEATURES_KIND, name, scratch, {"config": {"uses_labels": False}})
    return overrides


def test_reference_reads_the_fuse_subsets_and_writes_fuse_shaped_results(tmp_path, one_thread):
    overrides = cache_features(tmp_path)
    written = logreg_concat.main(["--seeds", "0,1", "--out", str(tmp_path / "out"), *overrides, "labels.per_class=5"])
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == [
        "rotation+simclr_5-class/seed_0/results.json",
        "rotation+simclr_5-class/seed_1/results.json",
    ]
    cfg = logreg_concat.fuse_config([*overrides, "labels.per_class=5", "fusion=concat"])
    ctx = open_context(cfg, 0)
    features = {
        p: load_features(
            ctx.store, features_artifact(ctx, encoder_artifact(ctx, pretext_recipe(p, ctx.overrides), None))
        )
        for p in ("rotation", "simclr")
    }
    concat = FUSIONS.typed_config(cfg.fusion, key="fusion")
    for seed, path in enumerate(written):
        record = json.loads(path.read_text())
        assert record["method"] == "reference: logreg_cv(concat)" and record["pretexts"] == ["rotation", "simclr"]
        assert (record["dataset"], record["encoder"], record["encoder_seed"]) == ("synthetic", "small_cnn", 0)
        assert (record["regime"], record["seed"], record["n_labeled"]) == ("5/class", seed, 20)
        assert record["test_accuracy"] > 0.9 and not record["uses_test"] and not record["uses_all_labels"]
        labeled = LabelsConfig(per_class=5).subset(ctx.data.train_labels, seed)
        fields = LabelsConfig(per_class=5).fields(labeled, seed, ctx.data.train_labels)
        assert record["labeled_indices_sha256"] == fields["labeled_indices_sha256"]
        head = fuse_once(features, concat, LabelsConfig(per_class=5), seed)  # what `sslfuse fuse fusion=concat` fits
        assert record["labeled_indices_sha256"] == head["labeled_indices_sha256"]
        assert set(head) >= {k for k in record if k not in ("selected_c", "predictions_file")}  # written: the files
    assert written[0].with_suffix(".csv").is_file()
    # another seed draws another subset
    assert (
        json.loads(written[0].read_text())["labeled_indices_sha256"]
        != json.loads(written[1].read_text())["labeled_indices_sha256"]
    )


def test_noise_features_alone_score_near_chance(tmp_path, one_thread):
    overrides = cache_features(tmp_path)
    (path,) = logreg_concat.main(
        ["--seeds", "3", "--out", str(tmp_path / "out"), *overrides, "pretexts=[simclr]", "labels.fraction=0.1"]
    )
    record = json.loads(path.read_text())
    assert record["regime"] == "10%" and record["pretexts"] == ["simclr"] and record["test_accuracy"] < 0.5


@pytest.mark.slow
def test_the_cli_fuse_reads_the_same_subset_and_report_tables_both(tmp_path):
    """`sslfuse fuse fusion=concat` on the same cached features and seed records the same labeled subset, and
    `sslfuse report` over both folders tables the reference beside the head."""
    overrides = cache_features(tmp_path)
    (path,) = logreg_concat.main(
        ["--seeds", "2", "--out", str(tmp_path / "results/reference"), *overrides, "labels.per_class=5"]
    )
    started = time.perf_counter()
    sslfuse(
        "fuse",
        *overrides,
        "labels.per_class=5",
        "fusion=concat",
        "seed=2",
        "hydra.run.dir=results/concat",
        cwd=tmp_path,
    )
    assert time.perf_counter() - started < 120
    head = json.loads((tmp_path / "results/concat/results.json").read_text())
    reference = json.loads(path.read_text())
    assert head["labeled_indices_sha256"] == reference["labeled_indices_sha256"]
    assert {k: head[k] for k in ("dataset", "encoder", "encoder_seed", "regime")} == {
        k: reference[k] for k in ("dataset", "encoder", "encoder_seed", "regime")
    }
    sslfuse("report", "results", cwd=tmp_path)
    table = (tmp_path / "results/report.md").read_text()
    assert "reference: logreg_cv(concat)" in table and "concat(rotation+simclr)" in table


def test_a_missing_cache_is_refused_naming_the_command(tmp_path):
    with pytest.raises(
        Exception, match="no cached features for pretext 'rotation'.*sslfuse cache pretexts=\\[rotation\\]"
    ):
        logreg_concat.main(
            [
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "out"),
                *DATA,
                f"artifacts_dir={tmp_path}/empty",
                "pretexts=[rotation]",
            ]
        )


def test_features_of_the_fixture_are_what_the_store_serves(tmp_path):
    overrides = cache_features(tmp_path)
    ctx = open_context(logreg_concat.fuse_config(overrides), 0)
    rotation = load_features(
        ctx.store, features_artifact(ctx, encoder_artifact(ctx, pretext_recipe("rotation", ctx.overrides), None))
    )
    assert torch.equal(rotation.train_labels, ctx.data.train_labels) and rotation.train.shape == (200, 8)
