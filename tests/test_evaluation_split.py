"""The evaluation split and what results keep for statistics: ``evaluation.split=dev`` scores on a seeded part of the
training split that no labeled subset, standardisation or selection ever reads; every result keeps its predictions
beside ``results.json``; the report never pools dev with test results and writes one long CSV row per result."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import sslfuse
from test_fusion import informative_and_noise
from test_report import result_record, write_results

from ssl_fusion.config import LabelsConfig, load_option
from ssl_fusion.data.splits import EvaluationConfig, complement, evaluation_sha256
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.protocol import fuse_arrays, fuse_result
from ssl_fusion.report.results import (
    collect_results,
    load_evaluation_labels,
    load_predictions,
    same_images,
)
from ssl_fusion.report.tables import LONG_COLUMNS, write_report
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.fuse import write_result

pytestmark = pytest.mark.usefixtures("one_thread")

DEV = EvaluationConfig(split="dev")
# classes of unequal sizes (13 to 200 images), in no particular order
UNEVEN = torch.cat([torch.full((size,), cls) for cls, size in enumerate([30, 57, 200, 13, 88])])[
    torch.randperm(388, generator=torch.Generator().manual_seed(5))
]


def small_task() -> dict:
    """``informative_and_noise`` with 100 test images."""
    return informative_and_noise(n_train=600, n_test=100)


def quick(name: str):
    """Head ``name`` with a short selection run: a fuse on ``small_task`` takes about a second."""
    return dataclasses.replace(load_option(FUSIONS, name), steps=60, eval_every=20, restarts=1)


# The test split is left as it was.

# labeled_indices_sha256 of LabelsConfig(...).subset(torch.arange(1000) % 10, seed), computed on main at commit 09eec40
# (before evaluation.split existed) with: cfg.fields(cfg.subset(labels, seed), seed, labels)["labeled_indices_sha256"]
BEFORE = [
    (LabelsConfig(fraction=0.01), 0, "7f129f97f2be671a"),
    (LabelsConfig(fraction=0.05), 7, "4d848548c5e08227"),
    (LabelsConfig(fraction=None, per_class=4), 3, "c368c20f1d933005"),
]


@pytest.mark.parametrize(("labels_cfg", "seed", "expected"), BEFORE)
def test_test_split_labeled_subsets_are_the_ones_drawn_before(labels_cfg, seed, expected):
    labels = torch.arange(1000) % 10
    for labeled in (labels_cfg.subset(labels, seed), EvaluationConfig().labeled(labels_cfg, labels, seed)):
        assert labels_cfg.fields(labeled, seed, labels)["labeled_indices_sha256"] == expected


def test_fuse_arrays_on_the_test_split_draws_the_subset_it_drew_before():
    """The same call on main at commit 09eec40 gave labeled_indices_sha256 683e1390e2594780 (30 labels)."""
    rng = np.random.default_rng(0)
    y, y_test = np.arange(300) % 3, np.arange(90) % 3
    x, x_test = rng.normal(size=(300, 6)) + y[:, None], rng.normal(size=(90, 6)) + y_test[:, None]
    result = fuse_arrays(
        {"a": x},
        y,
        {"a": x_test},
        y_test,
        fusion="concat",
        options={"steps": 20, "eval_every": 10},
        fraction=0.1,
        seed=2,
    )
    assert (result["labeled_indices_sha256"], result["n_labeled"], result["split"]) == ("683e1390e2594780", 30, "test")
    assert result["evaluation_size"] == 90 and "dev_fraction" not in result


# The dev split lies outside every labeled subset.

REGIMES = [
    *(LabelsConfig(fraction=fraction) for fraction in (0.01, 0.1, 0.5, 1.0)),
    *(LabelsConfig(fraction=None, per_class=per_class) for per_class in (1, 10)),
]


@pytest.mark.parametrize("labels_cfg", REGIMES, ids=lambda c: f"fraction={c.fraction},per_class={c.per_class}")
@pytest.mark.parametrize("dev_fraction", [0.1, 0.25])
def test_no_labeled_subset_of_any_seed_touches_the_dev_split(labels_cfg, dev_fraction):
    """Over 100 label seeds: the dev part is the same for every seed (its own seed draws it), stratified, and outside
    every labeled subset, which labels as many images of a class as the regime labels on the whole training split
    (a fraction: at most what the dev part leaves of the class)."""
    evaluation = EvaluationConfig(split="dev", dev_fraction=dev_fraction)
    dev = evaluation.dev_rows(UNEVEN)
    sizes = torch.bincount(UNEVEN)
    assert torch.bincount(UNEVEN[dev]).tolist() == [max(1, round(dev_fraction * int(n))) for n in sizes]
    left = sizes - torch.bincount(UNEVEN[dev])
    for seed in range(100):
        labeled = evaluation.labeled(labels_cfg, UNEVEN, seed)
        assert not set(labeled.tolist()) & set(dev.tolist())
        whole = torch.bincount(UNEVEN[labels_cfg.subset(UNEVEN, seed)], minlength=5)
        assert torch.bincount(UNEVEN[labeled], minlength=5).tolist() == torch.minimum(whole, left).tolist()
    assert torch.equal(evaluation.dev_rows(UNEVEN), dev)
    assert not torch.equal(EvaluationConfig(split="dev", dev_fraction=dev_fraction, dev_seed=1).dev_rows(UNEVEN), dev)


def test_an_indices_file_outside_the_dev_split_is_used_as_given(tmp_path):
    dev = DEV.dev_rows(UNEVEN)
    outside = complement(dev, len(UNEVEN))[::7]
    (tmp_path / "idx.txt").write_text("\n".join(map(str, outside.tolist())))
    labeled = DEV.labeled(LabelsConfig(indices_file=str(tmp_path / "idx.txt")), UNEVEN, seed=3)
    assert torch.equal(labeled, outside)


def test_an_indices_file_that_lists_a_dev_image_is_refused_naming_the_file_and_index(tmp_path):
    dev = DEV.dev_rows(UNEVEN)
    (tmp_path / "idx.txt").write_text(f"{int(complement(dev, len(UNEVEN))[0])}\n{int(dev[2])}\n")
    with pytest.raises(UserError, match=rf"labels.indices_file '.*idx.txt': index {int(dev[2])} lies in the dev split"):
        DEV.labeled(LabelsConfig(indices_file=str(tmp_path / "idx.txt")), UNEVEN, seed=0)


def test_nothing_a_head_is_selected_or_trained_on_reads_the_dev_rows():
    """Replacing the dev rows' features by huge values changes the dev scores and nothing else: the labeled subset,
    the screen, the selection and the loss curve come from the other training rows alone (the standardisation
    included, whose statistics are those of the training split without its dev part)."""
    features = small_task()
    dev = DEV.dev_rows(features["good"].train_labels)
    poisoned = {}
    for name, fs in features.items():
        train = fs.train.clone()
        train[dev] = 1e6
        poisoned[name] = dataclasses.replace(fs, train=train)
    held_out = poisoned["good"].held_out(dev)
    rest = complement(dev, len(dev) + len(held_out.train))
    assert torch.allclose(held_out.scale[0], features["good"].train[rest].mean(0, keepdim=True), atol=1e-6)
    cfg = quick("concat")
    clean, dirty = (fuse_result(f, cfg, LabelsConfig(fraction=0.1), 0, DEV) for f in (features, poisoned))
    same = ("labels", "selection")
    assert all(getattr(clean, key) == getattr(dirty, key) for key in same)
    assert clean.details["screen_scores"] == dirty.details["screen_scores"]
    assert clean.details["final_loss"] == dirty.details["final_loss"]
    assert clean.metrics["dev_accuracy"] > 0.6 and clean.metrics != dirty.metrics


def test_a_dev_result_says_so():
    result = fuse_result(
        small_task(),
        quick("concat"),
        LabelsConfig(fraction=0.1),
        0,
        EvaluationConfig(split="dev", dev_fraction=0.2, dev_seed=4),
    )
    record = result.to_record()
    described = (record["split"], record["dev_fraction"], record["dev_seed"], record["evaluation_size"])
    assert described == ("dev", 0.2, 4, 120)
    assert {"dev_accuracy", "dev_macro_f1", "dev_nll"} <= set(record) and "test_accuracy" not in record
    assert record["n_labeled"] == 60  # as many as 10% of the whole training split labels


def test_fuse_arrays_scores_on_the_dev_split_when_asked():
    features = small_task()
    args = (
        {n: fs.train.numpy() for n, fs in features.items()},
        features["good"].train_labels.numpy(),
        {n: fs.test.numpy() for n, fs in features.items()},
        features["good"].test_labels.numpy(),
    )
    result = fuse_arrays(*args, fusion="concat", fraction=0.1, seed=0, split="dev")
    assert (result["split"], result["evaluation_size"], result["dev_fraction"]) == ("dev", 60, 0.1)
    with pytest.raises(UserError, match="evaluation.split: 'val' is not one of test, dev"):
        fuse_arrays(*args, fusion="concat", split="val")


# Predictions are kept, pair image by image, and match the recorded scores.


@pytest.mark.parametrize("evaluation", [EvaluationConfig(), DEV], ids=["test", "dev"])
def test_predictions_round_trip_and_give_the_recorded_accuracy(tmp_path, evaluation):
    features = small_task()
    for name in ("concat", "mean"):
        write_result(tmp_path / name, fuse_result(features, quick(name), LabelsConfig(fraction=0.1), 0, evaluation))
    results = collect_results(tmp_path)
    split = evaluation.split
    for _, row in results.iterrows():
        predicted, labels = load_predictions(row), load_evaluation_labels(row)
        assert predicted.dtype == np.int16 and len(predicted) == row["evaluation_size"]
        correct = int((predicted == labels).sum())
        assert correct == round(row[f"{split}_accuracy"] * len(labels))
        assert float(np.float32(correct) / np.float32(len(labels))) == row[f"{split}_accuracy"]
    expected = (
        features["good"].test_labels
        if split == "test"
        else features["good"].train_labels[DEV.dev_rows(features["good"].train_labels)]
    )
    assert np.array_equal(load_evaluation_labels(results.iloc[0]), expected.numpy())
    assert same_images(results.iloc[0], results.iloc[1])
    record = json.loads((tmp_path / "concat" / "results.json").read_text())
    indices = torch.arange(len(expected)) if split == "test" else DEV.dev_rows(features["good"].train_labels)
    assert record["predictions_file"] == "predictions.npz"
    assert record["evaluation_sha256"] == evaluation_sha256(split, indices, expected)


def test_results_on_other_images_do_not_pair_and_old_results_have_no_predictions(tmp_path):
    features = small_task()
    cfg = quick("concat")
    for evaluation in (EvaluationConfig(), DEV):
        write_result(tmp_path / evaluation.split, fuse_result(features, cfg, LabelsConfig(fraction=0.1), 0, evaluation))
    write_results(tmp_path, [result_record("concat", ["a"], 0.9)])  # a result from before predictions were kept
    results = collect_results(tmp_path)
    old, test, dev = (
        results[results["evaluation_sha256"].isna()].iloc[0],
        *(
            results[results["split"].eq(split) & results["evaluation_sha256"].notna()].iloc[0]
            for split in ("test", "dev")
        ),
    )
    assert load_predictions(old) is None and not same_images(old, old) and not same_images(old, test)
    assert same_images(test, test) and not same_images(test, dev)


# The report keeps the splits apart and writes one long row per result.


def split_records() -> list[dict]:
    """concat and mean in one context over three label seeds, on the test split (90 and 80) and on the dev split (50
    and 60)."""
    records = []
    for seed in range(3):
        for method, test, dev in (("concat", 0.90, 0.50), ("mean", 0.80, 0.60)):
            records.append(result_record(method, ["a", "b"], test, seed))
            records.append(
                result_record(
                    method,
                    ["a", "b"],
                    dev,
                    seed,
                    split="dev",
                    dev_accuracy=dev,
                    test_accuracy=None,
                    dev_fraction=0.1,
                    dev_seed=0,
                )
            )
    return [{k: v for k, v in r.items() if v is not None or k != "test_accuracy"} for r in records]


def test_a_dev_result_is_never_pooled_or_paired_with_a_test_result(tmp_path):
    write_results(tmp_path, split_records())
    table, md_path, csv_path = write_report(tmp_path)
    stats = pd.read_csv(csv_path).set_index(["split", "method"])["mean"]
    assert stats.to_dict() == pytest.approx(
        {
            ("test", "concat(a+b)"): 90.0,
            ("test", "mean(a+b)"): 80.0,
            ("dev", "concat(a+b)"): 50.0,
            ("dev", "mean(a+b)"): 60.0,
        }
    )
    markdown = md_path.read_text()
    assert "# Test split" in markdown and "# Dev split" in markdown
    assert "70.00" not in markdown and "Dev accuracy (%)" in markdown
    test_pairs = pd.read_csv(tmp_path / "paired_differences.csv").set_index("method")
    dev_pairs = pd.read_csv(tmp_path / "dev_paired_differences.csv").set_index("method")
    assert test_pairs.loc["mean(a+b)", "difference"] == pytest.approx(-10.0)
    assert dev_pairs.loc["mean(a+b)", "difference"] == pytest.approx(10.0)
    assert [str(pairs.loc["mean(a+b)", "pairs"]).split()[0] for pairs in (test_pairs, dev_pairs)] == ["3", "3"]
    assert table.index.get_level_values("split").unique().tolist() == ["test", "dev"]


def test_dev_results_alone_are_headed_as_dev(tmp_path):
    write_results(tmp_path, [r for r in split_records() if r["split"] == "dev"])
    md_path = write_report(tmp_path)[1]
    assert md_path.read_text().startswith("# Dev split") and (tmp_path / "dev_accuracy_vs_labels.png").is_file()
    assert not (tmp_path / "accuracy_vs_labels.png").exists()


def test_the_long_csv_has_one_row_per_result_with_the_listed_columns(tmp_path):
    records = split_records()
    write_results(tmp_path, records)
    write_result(tmp_path / "fused", fuse_result(small_task(), quick("concat"), LabelsConfig(fraction=0.1), 0, DEV))
    write_report(tmp_path)
    long = pd.read_csv(tmp_path / "results_long.csv")
    listed = [
        "dataset",
        "pretraining_dataset",
        "encoder",
        "encoder_seed",
        "regime",
        "label_seed",
        "family",
        "options",
        "pretexts",
        "split",
        "accuracy",
        "macro_f1",
        "nll",
        "selected_l2",
        "selected_steps",
        "head_parameters",
        "fit_seconds",
        "commit",
    ]
    assert list(long.columns[: len(listed)]) == listed and list(long.columns) == list(LONG_COLUMNS)
    assert len(long) == len(records) + 1
    fused = long[long["family"].eq("concat") & long["predictions"].notna()].iloc[0]
    assert fused["split"] == "dev" and fused["predictions"] == "fused/predictions.npz"
    assert fused["accuracy"] > 0.6 and fused["head_parameters"] > 0 and fused["selected_l2"] > 0
    assert long.groupby("split")["accuracy"].count().to_dict() == {"dev": 7, "test": 6}


def test_every_result_records_the_code_commit():
    """The package's checkout commit (this repository's HEAD, ``-dirty`` with changes), or null outside a git
    checkout."""
    commit = fuse_result(small_task(), quick("mean"), LabelsConfig(fraction=0.1), 0).commit
    head = Path(__file__).resolve().parent.parent / ".git"
    assert commit is None if not head.exists() else len(commit.removesuffix("-dirty")) == 40


@pytest.mark.slow
def test_run_and_fuse_score_on_the_dev_split(tmp_path):
    """``sslfuse run`` and ``sslfuse fuse`` with ``evaluation.split=dev`` write dev results with their predictions,
    and a report of them heads its tables with the split."""
    sslfuse(
        "run",
        "preset=smoke",
        "evaluation.split=dev",
        "fusions=[concat]",
        "seeds=[0]",
        "hydra.run.dir=dev_run",
        cwd=tmp_path,
    )
    sslfuse(
        "fuse",
        "preset=smoke",
        "evaluation.split=dev",
        "fusion=supervised_scratch",
        "fusion.steps=10",
        "fusion.eval_every=5",
        "hydra.run.dir=dev_run/scratch",
        cwd=tmp_path,
    )
    results = collect_results(tmp_path / "dev_run")
    assert results["split"].tolist() == ["dev", "dev"] and results["evaluation_sha256"].nunique() == 1
    assert all(load_predictions(row) is not None for _, row in results.iterrows())
    assert (tmp_path / "dev_run" / "report.md").read_text().startswith("# Dev split")


def test_dev_results_on_other_dev_images_are_kept_apart(tmp_path):
    """Dev results drawn with two dev fractions were scored on other images: two dev tables, never one."""
    records = [r for r in split_records() if r["split"] == "dev"]
    write_results(tmp_path, [*records, *({**r, "dev_fraction": 0.2} for r in records)])
    markdown = write_report(tmp_path)[1].read_text()
    assert "# Dev[fraction=0.1,seed=0] split" in markdown and "# Dev[fraction=0.2,seed=0] split" in markdown
    assert "n=6" not in markdown and (tmp_path / "dev_fraction_0.2_seed_0_paired_differences.csv").is_file()


def test_kept_predictions_give_the_paired_interval_its_image_level(tmp_path):
    features = small_task()
    for seed in (0, 1):
        for name in ("concat", "mean"):
            result = fuse_result(features, quick(name), LabelsConfig(fraction=0.1), seed, DEV).in_context(
                {"dataset": "toy", "encoder": "none", "encoder_seed": 0}
            )
            write_result(tmp_path / f"{name}{seed}", result)
    write_report(tmp_path, references=["concat[steps=60]"])
    paired = pd.read_csv(tmp_path / "dev_paired_differences.csv").set_index("method")
    assert paired.loc["mean[steps=60,restarts=1](good+noise)", "resampled"].endswith(", 60 test images")
