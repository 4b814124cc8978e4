"""Paired differences: pairs share labeled subset, encoders and pretexts (never another seed's result), the best
single pretext is chosen on validation, encoder seeds are pooled only by name, the interval says what it resampled,
and primary comparisons are Holm-adjusted while the rest is exploratory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report import result_record

from ssl_fusion.report.paired import (
    Primary,
    paired_control_costs,
    paired_differences,
)
from ssl_fusion.report.statistics import holm
from ssl_fusion.report.tables import (
    collect_results,
    parse_arguments,
    pooled_over_encoder_seeds,
    write_report,
)
from ssl_fusion.runtime.errors import UserError


def result(
    method: str,
    pretexts: list[str],
    accuracy: float,
    seed: int,
    encoder_seed: int = 0,
    cv_accuracy: float | None = None,
    regime: str = "1%",
) -> dict:
    return result_record(method, pretexts, accuracy, seed, regime, cv_accuracy=cv_accuracy, encoder_seed=encoder_seed)


def write(folder: Path, records: list[dict]) -> pd.DataFrame:
    for number, row in enumerate(records):
        (folder / f"run{number}").mkdir()
        (folder / f"run{number}" / "results.json").write_text(json.dumps(row))
    return collect_results(folder)


def test_only_results_on_the_same_subset_encoders_and_pretexts_are_paired(tmp_path):
    """attention ran on label seeds 0, 1, 2 and concat on 0, 1, 5: two pairs. concat of encoder seed 1 and concat
    over other pretexts share label seeds with attention but are never its pair."""
    pretexts = ["a", "b"]
    results = write(
        tmp_path,
        [
            result("attention", pretexts, 0.82, 0),
            result("attention", pretexts, 0.80, 1),
            result("attention", pretexts, 0.90, 2),
            result("concat", pretexts, 0.80, 0),
            result("concat", pretexts, 0.81, 1),
            result("concat", pretexts, 0.10, 5),
            result("concat", pretexts, 0.10, 0, encoder_seed=1),
            result("concat", ["a", "b", "noise"], 0.10, 1),
        ],
    )
    table = paired_differences(results, ["concat"]).set_index(["method", "reference"])
    row = table.loc[("attention(a+b)", "concat")]
    assert row["pairs"] == "2"
    assert row["difference"] == pytest.approx(((82 - 80) + (80 - 81)) / 2)
    assert row["W/T/L"] == "1/0/1"
    assert len(table) == 1  # concat is never paired with itself, nor with concat over other pretexts


def test_best_single_is_chosen_on_validation_not_test(tmp_path):
    """single(a) has the better test accuracy, single(b) the better cross-validation accuracy: the reference is b."""
    records = []
    for seed in range(3):
        records += [
            result("single", ["a"], 0.90, seed, cv_accuracy=0.60),
            result("single", ["b"], 0.70, seed, cv_accuracy=0.80),
            result("concat", ["a", "b"], 0.75 + 0.01 * seed, seed),
        ]
    table = paired_differences(write(tmp_path, records)).set_index(["method", "reference"])
    row = table.loc[("concat(a+b)", "best single on validation (b)")]
    assert row["difference"] == pytest.approx(6.0)
    assert (row["pairs"], row["W/T/L"]) == ("3", "3/0/0")
    # 3 won pairs are not certainty: Wilson's interval over the 3 runs is the floor, (0.44, 1.00)
    assert row["P(improvement)"] == "1.00 [0.44, 1.00]"
    # one encoder seed: conditional on it, Student's t over the label seeds (the bootstrap's plug-in variance,
    # sd²·(2/3)/3, scaled back by 3/2, on 2 degrees of freedom)
    assert row["resampled"] == "conditional on encoder seed 0: 3 label seeds, test images not kept"
    assert row["df"] == pytest.approx(2)
    assert row["standard_error"] == pytest.approx(stats.sem([5.0, 6.0, 7.0]), rel=0.1)
    assert row["low"] == pytest.approx(6.0 - stats.t.ppf(0.975, 2) * row["standard_error"])


def test_best_single_is_chosen_per_label_seed_on_that_runs_own_labels(tmp_path):
    """Each (encoder seed, label seed) has its own labeled images, so its own best single: b wins the cross-validation
    of label seeds 0 and 1, a that of label seed 2 (pooled over the seeds, b would be chosen everywhere, with 3 times
    the labels one run has); on encoder seed 1 a wins every seed. A tie goes to the lower cross-validation loss."""
    cv = {(0, 0): (0.5, 0.9), (0, 1): (0.4, 0.8), (0, 2): (0.7, 0.3), (1, 0): (0.9, 0.1), (1, 1): (0.9, 0.1)}
    records = []
    for (encoder_seed, seed), (cv_a, cv_b) in cv.items():
        records += [
            result("single", ["a"], 0.60 + 0.01 * seed, seed, encoder_seed, cv_accuracy=cv_a),
            result("single", ["b"], 0.70 + 0.01 * seed, seed, encoder_seed, cv_accuracy=cv_b),
            result("concat", ["a", "b"], 0.80, seed, encoder_seed),
        ]
    tied = [result("single", [name], 0.5 + 0.1 * i, 3, cv_accuracy=0.5) for i, name in enumerate(["a", "b"])]
    for record, loss in zip(tied, [0.9, 0.4]):
        record["cv_nll"] = loss
    records += [*tied, result("concat", ["a", "b"], 0.80, 3)]
    row = paired_differences(write(tmp_path, records), ["best-single"]).set_index("method").loc["concat(a+b)"]
    # the test accuracy of each run's pick: b, b, a, b (the tie) on encoder seed 0; a, a on encoder seed 1
    picks = [70, 71, 62, 60, 60, 61]
    assert row["difference"] == pytest.approx(np.mean([80 - pick for pick in picks]), abs=0.005)  # 16; pooled: 14.33
    assert (row["pairs"], row["reference"]) == ("6", "best single on validation (a+b)")


def test_encoder_seeds_pool_only_under_their_names_with_n_as_a_product(tmp_path):
    records = [
        result("concat", ["a", "b"], 0.70 + 0.1 * encoder_seed + 0.01 * seed, seed, encoder_seed)
        for encoder_seed in (0, 1)
        for seed in range(3)
    ]
    records += [
        result("mean", ["a", "b"], 0.70 + 0.1 * encoder_seed, seed, encoder_seed)
        for encoder_seed in (0, 1)
        for seed in range(3)
    ]
    results = write(tmp_path, records)
    pooled = pooled_over_encoder_seeds(results).set_index("method")
    assert pooled.loc["concat(a+b)", "encoder_seed"] == "0+1"
    assert pooled.loc["concat(a+b)", "seeds"] == "2×3"
    assert pooled.loc["concat(a+b)", "mean"] == pytest.approx(76.0)
    table, md_path, _ = write_report(tmp_path)
    markdown = md_path.read_text()
    assert "## dataset mnist, encoder small_cnn, encoder seed 0+1" in markdown
    assert "76.00 ± 5.55 (n=2×3)" in markdown  # pooled (70, 71, 72, 80, 81, 82), and said so
    assert "71.00 ± 1.00 (n=3)" in markdown and "81.00 ± 1.00 (n=3)" in markdown  # each encoder seed alone
    paired = pd.read_csv(tmp_path / "paired_differences.csv").set_index(["method", "reference"])
    assert paired.loc[("mean(a+b)", "concat"), "pairs"] == "6 (2×3)"
    assert paired.loc[("mean(a+b)", "concat"), "difference"] == pytest.approx(-1.0)
    assert paired.loc[("mean(a+b)", "concat"), "W/T/L"] == "0/2/4"  # label seed 0 ties, up to float rounding
    assert "Paired differences" in markdown
    assert "Every row resamples 2 encoder seeds × 3 label seeds, test images not kept." in markdown
    assert "conditional on" not in markdown.split("Paired differences")[1].split("\n\n")[0]
    picture = matplotlib.image.imread(tmp_path / "paired_differences.png")
    assert picture.shape[0] > 100 and picture.shape[1] > 100


def test_one_pooled_row_per_method_is_not_made_from_one_encoder_seed(tmp_path):
    results = write(tmp_path, [result("concat", ["a"], 0.7, seed) for seed in range(3)])
    assert pooled_over_encoder_seeds(results).empty


def test_unknown_reference_is_refused_in_one_line(tmp_path):
    write(tmp_path, [result("concat", ["a", "b"], 0.7, 0), result("mean", ["a", "b"], 0.6, 0)])
    with pytest.raises(
        UserError, match=r"reference 'attention' is not among the results' methods; valid: concat, mean, best-single"
    ):
        write_report(tmp_path, references=["attention"])
    assert parse_arguments([str(tmp_path), "--reference=mean,best-single"]) == (tmp_path, ["mean", "best-single"], [])
    with pytest.raises(UserError, match="usage: sslfuse report"):
        parse_arguments([str(tmp_path), "--references", "mean"])


def test_the_cost_of_a_control_pretext_is_paired_within_one_method_and_its_options(tmp_path):
    """attention loses 1 and 3 points when noise is added (label seeds 0 and 1); seed 2 has no result without noise
    and is not paired; attention with other options is another method, compared only with itself."""
    with_noise, without = ["a", "b", "noise"], ["a", "b"]
    results = write(
        tmp_path,
        [
            result("attention", with_noise, 0.79, 0),
            result("attention", with_noise, 0.77, 1),
            result("attention", with_noise, 0.10, 2),
            result("attention", without, 0.80, 0),
            result("attention", without, 0.80, 1),
            result("attention[screen=False]", with_noise, 0.70, 0),
            result("attention[screen=False]", without, 0.80, 0),
        ],
    )
    costs = paired_control_costs(results, ("noise", "random")).set_index("method")
    assert costs.loc["attention", "difference"] == pytest.approx(-2.0)
    assert (costs.loc["attention", "pairs"], costs.loc["attention", "W/T/L"]) == ("2", "0/0/2")
    assert costs.loc["attention", "added"] == "noise" and costs.loc["attention", "pretexts"] == "a+b"
    assert costs.loc["attention[screen=False]", "difference"] == pytest.approx(-10.0)


def test_primary_is_parsed_with_options_and_refused_in_one_line_when_malformed(tmp_path):
    folder, references, primaries = parse_arguments(
        [str(tmp_path), "--primary=attention[combine=concat,screen=False]:concat,mean:best-single", "--primary=a:b"]
    )
    assert (folder, references) == (tmp_path, None)
    assert primaries == [
        Primary("attention[combine=concat,screen=False]", "concat"),
        Primary("mean", "best-single"),
        Primary("a", "b"),
    ]
    for bad in ("--primary=attention", "--primary=:concat", "--primary=attention:"):
        with pytest.raises(UserError, match=r"report: --primary: '.*' is not method:reference; usage: sslfuse report"):
            parse_arguments([str(tmp_path), bad])


def two_encoder_study(tmp_path) -> pd.DataFrame:
    """attention and mean beat concat by about 2 and 0.5 points, over 3 encoder seeds × 4 label seeds."""
    rng = np.random.default_rng(0)
    records = []
    for encoder_seed in range(3):
        for seed in range(4):
            base = 0.80 + 0.01 * encoder_seed + 0.003 * seed
            for title, gain in (("concat", 0.0), ("attention", 0.02), ("mean", 0.005)):
                records.append(result(title, ["a", "b"], base + gain + rng.normal(0, 0.004), seed, encoder_seed))
    return write(tmp_path, records)


def test_primaries_are_holm_adjusted_as_one_family_and_the_rest_is_exploratory(tmp_path):
    results = two_encoder_study(tmp_path)
    table = paired_differences(results, ["concat"], [Primary("attention", "concat"), Primary("mean(a+b)", "concat")])
    table = table.set_index("method")
    assert list(table["role"]) == ["primary", "primary"]
    adjusted = holm(table["p"].to_numpy())
    assert table["p (Holm)"].to_numpy() == pytest.approx(adjusted)
    for method, row in table.iterrows():
        # the adjusted interval holds the unadjusted one, and excludes 0 exactly when Holm rejects at 5%
        assert row["holm_low"] <= row["low"] and row["holm_high"] >= row["high"]
        assert (row["holm_low"] > 0 or row["holm_high"] < 0) == (row["p (Holm)"] <= 0.05), method
    assert table.loc["attention(a+b)", "resampled"] == "3 encoder seeds × 4 label seeds, test images not kept"
    only_one = paired_differences(results, None, [Primary("attention", "concat")]).set_index(["method", "reference"])
    assert only_one.loc[("attention(a+b)", "concat"), "role"] == "primary"
    assert only_one.loc[("attention(a+b)", "concat"), "p (Holm)"] == pytest.approx(
        only_one.loc[("attention(a+b)", "concat"), "p"]
    )  # a family of one: nothing to adjust
    assert set(only_one.drop(("attention(a+b)", "concat"))["role"]) == {"exploratory"}


def test_a_primary_that_names_no_comparison_is_refused_and_the_report_draws_the_family(tmp_path):
    two_encoder_study(tmp_path)
    with pytest.raises(UserError, match=r"primary 'select:concat' names no paired comparison; compared: attention:"):
        write_report(tmp_path, primaries=[Primary("select", "concat")])
    assert not (tmp_path / "report.md").exists()
    _, md_path, _ = write_report(tmp_path, primaries=[Primary("attention", "concat")])
    markdown = md_path.read_text()
    assert "Primary rows (1) are Holm-adjusted as one family" in markdown and "| exploratory |" in markdown
    paired = pd.read_csv(tmp_path / "paired_differences.csv")
    assert sorted(paired["role"].unique()) == ["exploratory", "primary"]
    assert paired.loc[paired["role"] == "primary", ["holm_low", "holm_high", "p (Holm)"]].notna().all().all()
    assert matplotlib.image.imread(tmp_path / "paired_differences.png").shape[0] > 100


def test_one_encoder_seed_gives_an_interval_conditional_on_that_encoder(tmp_path):
    records = [
        result(title, ["a", "b"], 0.8 + gain + 0.01 * seed * (title == "attention"), seed, encoder_seed=3)
        for seed in range(4)
        for title, gain in (("concat", 0.0), ("attention", 0.01))
    ]
    write(tmp_path, records)
    _, md_path, _ = write_report(tmp_path)
    markdown = md_path.read_text()
    assert "Every row resamples conditional on encoder seed 3: 4 label seeds, test images not kept." in markdown
    assert "the interval is conditional on that encoder" in markdown
