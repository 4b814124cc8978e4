"""The report: each method variant against itself with and without a control pretext, results of different
datasets, encoders and encoder seeds kept apart, and only honest rows marked best."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ssl_fusion.evaluation.result import FuseResult
from ssl_fusion.report.results import results_frame
from ssl_fusion.report.tables import (
    collect_results,
    negative_transfer,
    pivot,
    print_table,
    summarize,
    write_report,
)


def result_record(
    title: str, pretexts: list[str], accuracy: float, seed: int = 0, regime: str = "1%", **fields
) -> dict:
    """A results.json object of the method ``title`` (``select[by=knn]``: family select, options by=knn) in the
    context mnist, small_cnn, encoder seed 0 on one data fingerprint; ``fields`` replace any field or add details."""
    family, _, option = title.partition("[")
    key, _, value = option.rstrip("]").partition("=")
    result = FuseResult(
        method=f"{title}({'+'.join(pretexts)})",
        title=title,
        family=family,
        options={key: value} if option else {},
        pretexts=pretexts,
        labels={"regime": regime, "seed": seed, "labeled_indices_sha256": f"subset{seed}"},
        metrics={"test_accuracy": accuracy},
        dataset="mnist",
        pretraining_dataset="mnist",
        encoder="small_cnn",
        encoder_seed=0,
        data_fingerprint="d" * 16,
        pretraining_fingerprint="p" * 16,
    )
    return {**result.to_record(), **fields}


def record(method: str, pretexts: list[str], accuracy: float, seed: int, screened_out: list[str] | None = None) -> dict:
    return result_record(method, pretexts, accuracy, seed, screened_out=screened_out)


def frame(records: list[dict]) -> pd.DataFrame:
    return results_frame([FuseResult.from_record(r) for r in records])


def test_each_variant_of_a_head_is_compared_with_itself():
    rows = []
    for seed in (0, 1):
        rows += [
            record("select[by=val]", ["a", "b"], 0.80, seed),
            record("select[by=val]", ["a", "b", "random"], 0.78, seed),
            record("select[by=knn]", ["a", "b"], 0.70, seed),
            record("select[by=knn]", ["a", "b", "random"], 0.75, seed),
            record("concat", ["a", "b", "noise"], 0.81, seed, screened_out=["noise"] if seed == 0 else []),
            record("concat", ["a", "b"], 0.80, seed),
        ]
    table = negative_transfer(summarize(frame(rows))).set_index(["fusion", "added"])
    assert len(table) == 3
    assert table.loc[("select[by=val]", "random"), "difference"] == -2.0
    assert table.loc[("select[by=knn]", "random"), "difference"] == 5.0
    assert table.loc[("concat", "noise"), ["without", "with"]].tolist() == [80.0, 81.0]
    assert table.loc[("concat", "noise"), "screened out"] == "1 of 2 seeds"
    assert table.loc[("select[by=val]", "random"), "screened out"] == "0 of 2 seeds"


def test_results_from_before_the_screen_count_no_screened_seeds():
    rows = [record("mean", ["a", "noise"], 0.7, 0), record("mean", ["a"], 0.8, 0)]
    for row in rows:
        del row["screened_out"]
    table = negative_transfer(summarize(frame(rows)))
    assert table["screened out"].tolist() == ["0 of 1 seeds"]


def test_printed_table_keeps_bracketed_method_names(capsys):
    table = pd.DataFrame({"1%": ["80.00 ± 0.00 (n=1)"]}, index=["select[by=val](a+b)"])
    print_table(table, "title")
    assert "select[by=val](a+b)" in capsys.readouterr().out


def write_results(folder: Path, records: list[dict]) -> None:
    for number, row in enumerate(records):
        (folder / f"run{number}").mkdir()
        (folder / f"run{number}" / "results.json").write_text(json.dumps(row))


def fused(method: str, pretexts: list[str], accuracy: float, seed: int = 0, **fields) -> dict:
    return result_record(method, pretexts, accuracy, seed, **fields)


def test_two_datasets_in_one_folder_are_never_averaged(tmp_path):
    """One folder with the same methods on two datasets: every table keeps the datasets apart (90 and 50, never
    70), the negative-transfer rows compare within one dataset, and report.md gives each dataset its own table."""
    write_results(
        tmp_path,
        [
            fused("concat", ["a"], 0.90, dataset="mnist"),
            fused("concat", ["a", "noise"], 0.80, dataset="mnist"),
            fused("concat", ["a"], 0.50, dataset="cifar10"),
            fused("concat", ["a", "noise"], 0.55, dataset="cifar10"),
        ],
    )
    stats = summarize(collect_results(tmp_path)).set_index(["dataset", "method"])
    assert stats.loc[("mnist", "concat(a)"), "mean"] == pytest.approx(90.0)
    assert stats.loc[("cifar10", "concat(a)"), "mean"] == pytest.approx(50.0)
    assert stats["seeds"].tolist() == [1, 1, 1, 1]
    transfer = negative_transfer(summarize(collect_results(tmp_path))).set_index("dataset")
    assert transfer.loc["mnist", "difference"] == pytest.approx(-10.0)
    assert transfer.loc["cifar10", "difference"] == pytest.approx(5.0)
    table, md_path, csv_path = write_report(tmp_path)
    assert table.loc[("cifar10", "small_cnn", "0", "concat(a)"), "1%"] == "50.00 ± 0.00 (n=1)"
    markdown = md_path.read_text()
    assert "**90.00 ± 0.00 (n=1)**" in markdown and "**55.00 ± 0.00 (n=1)**" in markdown
    assert "70.00" not in markdown
    assert "## dataset cifar10, encoder small_cnn, encoder seed 0" in markdown
    assert "## dataset mnist, encoder small_cnn, encoder seed 0" in markdown
    assert sorted(pd.read_csv(csv_path)["dataset"]) == ["cifar10", "cifar10", "mnist", "mnist"]


def test_two_encoder_seeds_are_kept_apart_and_unrecorded_seeds_form_one_group(tmp_path):
    """Encoders pretrained with seeds 0 and 1 give two rows, not their mean; results without an encoder seed (run
    outside a stage) fall in one group of their own."""
    write_results(
        tmp_path,
        [
            fused("concat", ["a"], 0.90, seed=0, encoder_seed=0),
            fused("concat", ["a"], 0.70, seed=0, encoder_seed=1),
            fused("concat", ["a"], 0.60, seed=0),
            fused("concat", ["a"], 0.62, seed=1),
        ],
    )
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("results.json"))]
    for row in records[2:]:
        row["encoder_seed"] = None
    for path, row in zip(sorted(tmp_path.rglob("results.json")), records):
        path.write_text(json.dumps(row))
    stats = summarize(collect_results(tmp_path))
    assert sorted(zip(stats["encoder_seed"], stats["mean"].round(2), stats["seeds"])) == [
        ("0", 90.0, 1),
        ("1", 70.0, 1),
        ("unrecorded", 61.0, 2),
    ]
    table = pivot(stats)
    assert table.index.names == ["dataset", "encoder", "encoder_seed", "method"]
    assert table.loc[("mnist", "small_cnn", "1", "concat(a)"), "1%"] == "**70.00 ± 0.00 (n=1)**"


def test_rows_that_peek_at_the_test_set_or_use_all_labels_are_never_best(tmp_path):
    """The oracle selection and an encoder trained with all labels have the highest means, yet the bold best of
    the column is the best honest row; the two keep their place in the ranking, unbolded."""
    rows = [
        fused("select[oracle: uses test]", ["a", "b"], 0.95, uses_test=True, options={"by": "oracle"}),
        fused("concat", ["a[all labels]", "b"], 0.97, uses_all_labels=True),
        fused("concat", ["a", "b"], 0.80),
        fused("mean", ["a", "b"], 0.70),
    ]
    write_results(tmp_path, rows)
    table = pivot(summarize(collect_results(tmp_path)))["1%"]
    assert table.index.tolist() == [
        "concat(a[all labels]+b)",
        "select[oracle: uses test](a+b)",
        "concat(a+b)",
        "mean(a+b)",
    ]
    assert table.tolist() == [
        "97.00 ± 0.00 (n=1)",
        "95.00 ± 0.00 (n=1)",
        "**80.00 ± 0.00 (n=1)**",
        "70.00 ± 0.00 (n=1)",
    ]


def test_one_dataset_encoder_and_seed_give_one_plain_table(tmp_path):
    """With a single dataset, encoder and encoder seed the table is indexed by method alone and report.md has no
    per-combination headings."""
    write_results(tmp_path, [fused("concat", ["a"], 0.90), fused("mean", ["a"], 0.80)])
    table, md_path, _ = write_report(tmp_path)
    assert table.index.name == "method" and table["1%"].tolist() == ["**90.00 ± 0.00 (n=1)**", "80.00 ± 0.00 (n=1)"]
    assert "## " not in md_path.read_text()
