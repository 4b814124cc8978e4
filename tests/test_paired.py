"""Paired differences: the interval is Student's, pairs share labeled subset, encoders and pretexts (never another
seed's result), the best single pretext is chosen on validation, and encoder seeds are pooled only by name."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ssl_fusion.report.paired import (
    paired_control_costs,
    paired_differences,
    t_interval,
)
from ssl_fusion.report.tables import (
    collect_results,
    parse_arguments,
    pooled_over_encoder_seeds,
    write_report,
)
from ssl_fusion.runtime.errors import UserError
from test_report import result_record


def result(method: str, pretexts: list[str], accuracy: float, seed: int, encoder_seed: int = 0,
           cv_accuracy: float | None = None, regime: str = "1%") -> dict:
    return result_record(method, pretexts, accuracy, seed, regime, cv_accuracy=cv_accuracy, encoder_seed=encoder_seed)


def write(folder: Path, records: list[dict]) -> pd.DataFrame:
    for number, row in enumerate(records):
        (folder / f"run{number}").mkdir()
        (folder / f"run{number}" / "results.json").write_text(json.dumps(row))
    return collect_results(folder)


def test_interval_is_students_t_on_known_numbers_and_equals_scipys_paired_test():
    mean, low, high = t_interval(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    # sd = sqrt(2.5), se = sd / sqrt(5) = 0.70711, t(0.975, 4) = 2.77645 (tables)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - 2.77645 * 0.70711, 3.0 + 2.77645 * 0.70711), abs=1e-4)
    a, b = np.array([81.2, 80.1, 82.5, 79.9, 80.7, 81.6]), np.array([80.0, 80.3, 81.0, 79.1, 80.2, 80.9])
    expected = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert t_interval(a - b)[1:] == pytest.approx((expected.low, expected.high))
    assert np.isnan(t_interval(np.array([2.0]))[1])  # one pair: no interval


def test_only_results_on_the_same_subset_encoders_and_pretexts_are_paired(tmp_path):
    """attention ran on label seeds 0, 1, 2 and concat on 0, 1, 5: two pairs. concat of encoder seed 1 and concat
    over other pretexts share label seeds with attention but are never its pair."""
    pretexts = ["a", "b"]
    results = write(tmp_path, [
        result("attention", pretexts, 0.82, 0), result("attention", pretexts, 0.80, 1), result("attention", pretexts, 0.90, 2),
        result("concat", pretexts, 0.80, 0), result("concat", pretexts, 0.81, 1), result("concat", pretexts, 0.10, 5),
        result("concat", pretexts, 0.10, 0, encoder_seed=1), result("concat", ["a", "b", "noise"], 0.10, 1),
    ])
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
        records += [result("single", ["a"], 0.90, seed, cv_accuracy=0.60), result("single", ["b"], 0.70, seed, cv_accuracy=0.80),
                    result("concat", ["a", "b"], 0.75 + 0.01 * seed, seed)]
    table = paired_differences(write(tmp_path, records)).set_index(["method", "reference"])
    row = table.loc[("concat(a+b)", "best single on validation (b)")]
    assert row["difference"] == pytest.approx(6.0)
    assert (row["pairs"], row["W/T/L"]) == ("3", "3/0/0")
    assert row["low"] == pytest.approx(6.0 - stats.t.ppf(0.975, 2) * stats.sem([5.0, 6.0, 7.0]), abs=0.01)


def test_encoder_seeds_pool_only_under_their_names_with_n_as_a_product(tmp_path):
    records = [result("concat", ["a", "b"], 0.70 + 0.1 * encoder_seed + 0.01 * seed, seed, encoder_seed)
               for encoder_seed in (0, 1) for seed in range(3)]
    records += [result("mean", ["a", "b"], 0.70 + 0.1 * encoder_seed, seed, encoder_seed) for encoder_seed in (0, 1) for seed in range(3)]
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
    picture = matplotlib.image.imread(tmp_path / "paired_differences.png")
    assert picture.shape[0] > 100 and picture.shape[1] > 100


def test_one_pooled_row_per_method_is_not_made_from_one_encoder_seed(tmp_path):
    results = write(tmp_path, [result("concat", ["a"], 0.7, seed) for seed in range(3)])
    assert pooled_over_encoder_seeds(results).empty


def test_unknown_reference_is_refused_in_one_line(tmp_path):
    write(tmp_path, [result("concat", ["a", "b"], 0.7, 0), result("mean", ["a", "b"], 0.6, 0)])
    with pytest.raises(UserError, match=r"reference 'attention' is not among the results' methods; valid: concat, mean, best-single"):
        write_report(tmp_path, references=["attention"])
    assert parse_arguments([str(tmp_path), "--reference=mean,best-single"]) == (tmp_path, ["mean", "best-single"])
    with pytest.raises(UserError, match="usage: sslfuse report"):
        parse_arguments([str(tmp_path), "--references", "mean"])


def test_the_cost_of_a_control_pretext_is_paired_within_one_method_and_its_options(tmp_path):
    """attention loses 1 and 3 points when noise is added (label seeds 0 and 1); seed 2 has no result without noise
    and is not paired; attention with other options is another method, compared only with itself."""
    with_noise, without = ["a", "b", "noise"], ["a", "b"]
    results = write(tmp_path, [
        result("attention", with_noise, 0.79, 0), result("attention", with_noise, 0.77, 1), result("attention", with_noise, 0.10, 2),
        result("attention", without, 0.80, 0), result("attention", without, 0.80, 1),
        result("attention[screen=False]", with_noise, 0.70, 0), result("attention[screen=False]", without, 0.80, 0),
    ])
    costs = paired_control_costs(results, ("noise", "random")).set_index("method")
    assert costs.loc["attention", "difference"] == pytest.approx(-2.0)
    assert (costs.loc["attention", "pairs"], costs.loc["attention", "W/T/L"]) == ("2", "0/0/2")
    assert costs.loc["attention", "added"] == "noise" and costs.loc["attention", "pretexts"] == "a+b"
    assert costs.loc["attention[screen=False]", "difference"] == pytest.approx(-10.0)
