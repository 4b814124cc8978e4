"""The result contract: every result is a ``FuseResult`` written as one flat JSON object, the report decides on its
fields (family, options, flags, fingerprints), never on its label."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_report import result_record, write_results

from ssl_fusion.config import TrainOverrides
from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.evaluation.result import FuseResult
from ssl_fusion.fusion.protocol import fuse_arrays
from ssl_fusion.models.encoders import SmallCNNConfig
from ssl_fusion.report.paired import paired_differences
from ssl_fusion.report.results import collect_results, load_result
from ssl_fusion.report.tables import pivot, summarize
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.fuse import run_context, write_result
from ssl_fusion.store.files import ArtifactStore


def test_a_result_is_written_as_one_object_and_one_csv_row_and_reads_back(tmp_path):
    """Keys a label subset or the protocol adds (here ``classes_without_labels``) flow through, and so do the class
    names."""
    result = FuseResult(
        method="attention[combine=concat](a+b)",
        title="attention[combine=concat]",
        family="attention",
        options={"combine": "concat"},
        pretexts=["a", "b"],
        labels={"regime": "1%", "seed": 3, "n_labeled": 12, "classes_without_labels": [7]},
        metrics={"test_accuracy": 0.75, "test_nll": 0.6},
        selection={"selected_l2": 0.01, "folds": 5},
        dataset="synthetic",
        pretraining_dataset="digits",
        encoder="small_cnn",
        encoder_seed=1,
        data_fingerprint="a" * 16 + "/" + "b" * 16,
        pretraining_fingerprint="c" * 16,
        classes=["cat", "dog", "owl"],
        details={"fit_seconds": 0.5},
    )
    write_result(tmp_path, result)
    record = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(record, dict) and record["result_version"] == 2
    assert (record["family"], record["options"], record["uses_test"], record["split"]) == (
        "attention",
        {"combine": "concat"},
        False,
        "test",
    )
    assert record["classes_without_labels"] == [7] and record["classes"] == ["cat", "dog", "owl"]
    assert record["pretraining_fingerprint"] == "c" * 16 and record["test_accuracy"] == 0.75
    rows = pd.read_csv(tmp_path / "results.csv")
    assert len(rows) == 1 and rows.loc[0, "pretexts"] == "a+b" and rows.loc[0, "family"] == "attention"
    again = load_result(tmp_path / "results.json")
    assert again.to_record() == record
    assert (again.family, again.metrics, again.selection, again.labels["seed"], again.classes) == (
        "attention",
        {"test_accuracy": 0.75, "test_nll": 0.6},
        {"selected_l2": 0.01, "folds": 5},
        3,
        ["cat", "dog", "owl"],
    )


def test_a_group_key_may_not_hide_another_field():
    with pytest.raises(ValueError, match="clash"):
        FuseResult(
            method="m",
            title="m",
            family="concat",
            options={},
            pretexts=[],
            labels={"family": "x"},
            metrics={"test_accuracy": 1.0},
        ).to_record()


@pytest.mark.parametrize(
    "options, family, title, uses_test",
    [
        ({"by": "knn"}, "select", "select[by=knn]", False),
        ({"by": "oracle"}, "select", "select[oracle: uses test]", True),
    ],
)
def test_the_protocol_records_family_options_and_flags_as_fields(options, family, title, uses_test):
    generator = np.random.default_rng(0)
    labels = np.arange(60) % 3
    good = generator.normal(size=(60, 4)) + np.eye(3, 4)[labels] * 3
    noise = generator.normal(size=(60, 4))
    train, test = {"good": good[:40], "noise": noise[:40]}, {"good": good[40:], "noise": noise[40:]}
    result = fuse_arrays(
        train, labels[:40], test, labels[40:], fusion="select", options=options, fraction=None, per_class=4
    )
    assert (result["family"], result["options"]) == (family, options)
    assert (result["title"], result["uses_test"]) == (title, uses_test)
    assert result["method"] == f"{title}(good+noise)" and result["pretexts"] == ["good", "noise"]


def test_the_report_decides_on_fields_never_on_labels(tmp_path):
    """A label that claims an oracle does not make a row an oracle, a plain label does not hide one, and the best
    single pretext is found by family whatever its title."""
    rows = []
    for seed in range(2):
        rows += [
            result_record("select[oracle: uses test]", ["a", "b"], 0.90, seed),  # only the label says oracle
            result_record("concat", ["a", "b"], 0.95, seed, uses_test=True),
            result_record("alone", ["a"], 0.70, seed, family="single", cv_accuracy=0.8),
        ]
    write_results(tmp_path, rows)
    results = collect_results(tmp_path)
    table = pivot(summarize(results))["1%"]
    assert table["select[oracle: uses test](a+b)"] == "**90.00 ± 0.00 (n=2)**"
    assert table["concat(a+b)"] == "95.00 ± 0.00 (n=2)"
    paired = paired_differences(results).set_index(["method", "reference"])
    assert paired.loc[("concat(a+b)", "best single on validation (a)"), "difference"] == pytest.approx(25.0)


def synthetic_context(tmp_path, noise: float, pretraining_seed: int | None = None) -> StageContext:
    data = make_synthetic(SyntheticConfig(name="synthetic", noise=noise), root=None)
    pretraining = (
        None
        if pretraining_seed is None
        else make_synthetic(SyntheticConfig(name="synthetic", seed=pretraining_seed), root=None)
    )
    return StageContext(
        SyntheticConfig(name="synthetic", noise=noise),
        data,
        SmallCNNConfig(name="small_cnn"),
        torch.device("cpu"),
        torch.float32,
        ArtifactStore(tmp_path),
        TrainOverrides(),
        0,
        None if pretraining is None else SyntheticConfig(name="synthetic", seed=pretraining_seed),
        pretraining,
    )


def test_a_stage_records_the_fingerprints_of_the_data_and_of_the_pretraining_data(tmp_path):
    """Two synthetic settings under one name, and two pretraining datasets, give results of other contexts."""
    plain, noisier = run_context(synthetic_context(tmp_path, 0.15)), run_context(synthetic_context(tmp_path, 0.3))
    assert plain["dataset"] == noisier["dataset"] == "synthetic"
    assert plain["data_fingerprint"] != noisier["data_fingerprint"]
    assert plain["pretraining_fingerprint"] == plain["data_fingerprint"].split("/")[0]  # pretrained on its own data
    elsewhere = run_context(synthetic_context(tmp_path, 0.15, pretraining_seed=1))
    assert elsewhere["data_fingerprint"] == plain["data_fingerprint"]
    assert elsewhere["pretraining_fingerprint"] != plain["pretraining_fingerprint"]
