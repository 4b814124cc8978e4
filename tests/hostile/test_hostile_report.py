"""Hostile inputs to the report: published label splits, results of other data under one name, copied and damaged
results.json files, zero-width paired intervals."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import sslfuse
from test_report import result_record, write_results

from ssl_fusion import cli
from ssl_fusion.report.tables import collect_results, summarize, write_report


def report_cli(folder: Path, monkeypatch, capsys) -> tuple[int, str]:
    """``sslfuse report <folder>`` in this process: its exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["sslfuse", "report", str(folder)])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_a_published_label_split_is_reported_after_the_regimes_it_cannot_be_ordered_with(tmp_path):
    """A regime named by its indices file (``idx.txt``) sorts after per-class and fraction regimes."""
    write_results(
        tmp_path,
        [
            result_record("concat", ["a"], 0.9, regime="idx.txt"),
            result_record("concat", ["a"], 0.8, regime="1%"),
            result_record("concat", ["a"], 0.7, regime="10/class"),
        ],
    )
    table, md_path, _ = write_report(tmp_path)
    assert table.columns.tolist() == ["10/class", "1%", "idx.txt"]
    assert "**90.00 ± 0.00 (n=1)**" in md_path.read_text()


@pytest.mark.slow
def test_run_with_a_published_label_split_writes_its_table(tmp_path):
    (tmp_path / "idx.txt").write_text("\n".join(str(i) for i in range(20)) + "\n")
    sslfuse(
        "run",
        "preset=smoke",
        f"labels.indices_file={tmp_path / 'idx.txt'}",
        "fusions=[concat]",
        "seeds=[0]",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    report = pd.read_csv(tmp_path / "run" / "report.csv")
    assert report["regime"].tolist() == ["idx.txt"] and report["seeds"].tolist() == [1]


@pytest.mark.parametrize(
    "field, first, second",
    [
        ("data_fingerprint", "a" * 16 + "/" + "b" * 16, "c" * 16 + "/" + "d" * 16),  # two synthetic settings
        ("pretraining_fingerprint", "e" * 16, "f" * 16),  # two pretraining datasets
    ],
)
def test_results_on_other_data_under_one_name_are_never_averaged(tmp_path, field, first, second):
    write_results(
        tmp_path,
        [result_record("concat", ["a"], 0.9, **{field: first}), result_record("concat", ["a"], 0.5, **{field: second})],
    )
    stats = summarize(collect_results(tmp_path))
    assert sorted(stats["mean"]) == [50.0, 90.0] and stats["seeds"].tolist() == [1, 1]
    markdown = write_report(tmp_path)[1].read_text()
    assert "70.00" not in markdown and markdown.count("## dataset mnist (data ") == 2


def test_a_copied_result_counts_once_with_a_warning(tmp_path, caplog):
    write_results(tmp_path, [result_record("concat", ["a"], 0.9, seed=0), result_record("concat", ["a"], 0.7, seed=1)])
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "results.json").write_text(json.dumps(result_record("concat", ["a"], 0.9, seed=0), indent=4))
    with caplog.at_level(logging.WARNING, logger="sslfuse"):
        stats = summarize(collect_results(tmp_path))
    assert stats["seeds"].tolist() == [2] and stats["mean"].tolist() == [pytest.approx(80.0)]
    assert "holds the same result as" in caplog.text and str(tmp_path / "run0" / "results.json") in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"method": "concat(a)", ', "is not JSON"),
        (b"\xff\xfe not text", "cannot read"),
        (b"[1, 2, 3]", "not a JSON object but list"),
        (b'"a result"', "not a JSON object but str"),
        (
            json.dumps({k: v for k, v in result_record("concat", ["a"], 0.9).items() if k != "test_accuracy"}).encode(),
            "field 'test_accuracy' is missing",
        ),
        (
            json.dumps(result_record("concat", ["a"], 0.9, test_accuracy="high")).encode(),
            "field 'test_accuracy' must be",
        ),
        (
            json.dumps({**result_record("concat", ["a"], 0.9), "pretexts": "a"}).encode(),
            "field 'pretexts' must be list",
        ),
        (json.dumps(result_record("concat", ["a"], 0.9, uses_test="no")).encode(), "field 'uses_test' must be bool"),
        (
            json.dumps(
                {
                    "method": "concat(a)",
                    "fusion": "concat",
                    "pretexts": ["a"],
                    "regime": "1%",
                    "seed": 0,
                    "test_accuracy": 0.9,
                }
            ).encode(),
            "result_version is None",
        ),  # written before the contract
    ],
)
def test_a_damaged_results_json_is_refused_in_one_line_naming_it(tmp_path, monkeypatch, capsys, content, message):
    write_results(tmp_path, [result_record("concat", ["a"], 0.8)])
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "results.json").write_bytes(content)
    code, err = report_cli(tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(tmp_path / "damaged" / "results.json") in err and message in err, err
    assert not (tmp_path / "report.md").exists()


def test_a_zero_width_paired_interval_is_plotted(tmp_path):
    """Every pair differs by 1.23456 points: the interval has zero width around the unrounded mean, while the
    difference column is rounded to 1.23."""
    records = []
    for seed in range(3):
        records += [
            result_record("concat", ["a", "b"], 0.80 + 0.01 * seed, seed),
            result_record("attention", ["a", "b"], 0.8123456 + 0.01 * seed, seed),
        ]
    write_results(tmp_path, records)
    write_report(tmp_path)
    paired = pd.read_csv(tmp_path / "paired_differences.csv").set_index("method")
    assert paired.loc["attention(a+b)", "difference"] == 1.23
    assert paired.loc["attention(a+b)", "low"] == pytest.approx(1.23456)
    assert (tmp_path / "paired_differences.png").stat().st_size > 0


def test_report_md_holds_each_paragraph_once(tmp_path):
    records = []
    for encoder_seed in (0, 1):
        for seed in range(2):
            for title, pretexts, accuracy in (
                ("concat", ["a", "b"], 0.8),
                ("attention", ["a", "b"], 0.81),
                ("concat", ["a", "b", "noise"], 0.79),
                ("single", ["a"], 0.7),
            ):
                records.append(
                    result_record(
                        title, pretexts, accuracy + 0.01 * seed, seed, encoder_seed=encoder_seed, cv_accuracy=0.5
                    )
                )
    write_results(tmp_path, records)
    markdown = write_report(tmp_path)[1].read_text()
    for paragraph in (
        "Paired differences (accuracy points",
        "![paired differences]",
        "Negative transfer: accuracy",
        "Negative transfer, paired:",
        "![accuracy vs labels]",
    ):
        assert markdown.count(paragraph) == 1, paragraph


def test_a_rerun_kept_beside_the_first_run_is_refused_naming_both_folders(tmp_path, monkeypatch, capsys):
    """Two results of one method for the same encoder seed and label seed (a rerun: another fit time, so no copy)
    would be one pair counted twice: one line naming both folders, no report."""
    write_results(
        tmp_path,
        [
            result_record("attention", ["a", "b"], 0.81, seed=0, fit_seconds=1.0),
            result_record("attention", ["a", "b"], 0.82, seed=0, fit_seconds=2.0),
            result_record("concat", ["a", "b"], 0.80, seed=0),
        ],
    )
    code, err = report_cli(tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "2 results for encoder seed 0 and label seed 0" in err
    assert str(tmp_path / "run0") in err and str(tmp_path / "run1") in err
    assert not (tmp_path / "report.md").exists()


def test_best_single_picks_one_variant_of_the_single_head(tmp_path):
    """``single`` and ``single[l2_grid=...]`` on one pretext are two candidates for best-single, not one pair twice."""
    records = []
    for seed in (0, 1):
        records += [
            result_record("single", ["a"], 0.70, seed=seed, cv_accuracy=0.60),
            result_record("single[l2_grid=[0.1]]", ["a"], 0.72, seed=seed, cv_accuracy=0.65),
            result_record("concat", ["a"], 0.75, seed=seed),
        ]
    write_results(tmp_path, records)
    write_report(tmp_path)
    paired = pd.read_csv(tmp_path / "paired_differences.csv")
    row = paired[(paired["method"] == "concat(a)") & paired["reference"].str.startswith("best single")].iloc[0]
    assert str(row["pairs"]) == "2" and row["difference"] == pytest.approx(3.0)


def test_a_table_an_earlier_report_had_is_not_left_beside_a_new_report_without_it(tmp_path):
    """Dev results removed since the last report: their ``dev_*`` files go, the test split's are written again."""
    write_results(tmp_path, [result_record("concat", ["a"], 0.9, seed=s) for s in (0, 1)])
    stale = [tmp_path / "dev_paired_differences.csv", tmp_path / "dev_negative_transfer.csv"]
    for path in stale:
        path.write_text("from an earlier report\n")
        os.utime(path, (1e9, 1e9))  # written long before this report
    (tmp_path / "notes.csv").write_text("the user's own file\n")
    write_report(tmp_path)
    assert not any(path.exists() for path in stale)
    assert (tmp_path / "notes.csv").exists() and (tmp_path / "accuracy_vs_labels.png").exists()
