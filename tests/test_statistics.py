"""The report's statistics (``ssl_fusion/report/statistics.py``): the design-aware interval covers a known truth at
its nominal rate where the encoder-blind t does not, Holm's adjustment equals the step-down procedure written from
its definition, P(improvement) on cases with a known answer, and what the interval says it resampled."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ssl_fusion.report.paired import CORRECT, paired_stats
from ssl_fusion.report.statistics import compare, holm, holm_confidence

REPO = Path(__file__).resolve().parents[1]


def coverage_script():
    """scripts/coverage_simulation.py imported as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location("coverage_simulation", REPO / "scripts" / "coverage_simulation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_design_aware_interval_covers_the_truth_at_5x5_where_the_encoder_blind_t_does_not():
    """300 simulated studies, 5 encoder seeds × 5 crossed label seeds × 450 test images, known spreads and truth
    (seeded: the same table every run)."""
    table = coverage_script().coverage(encoders=5, labels=5, studies=300, seed=0).set_index("method")
    assert 0.92 <= table.loc["design-aware", "coverage"] <= 0.98, table
    assert table.loc["encoder-blind t", "coverage"] < 0.85, table


def holm_step_down(p_values: np.ndarray, alpha: float) -> set[int]:
    """Holm (1979) from its definition: order the p-values ascending; while the k-th (from 1) is at most
    alpha / (m - k + 1), reject its hypothesis; stop at the first that is not."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = set()
    for k, index in enumerate(order, start=1):
        if p_values[index] > alpha / (len(p_values) - k + 1):
            break
        rejected.add(index)
    return rejected


@pytest.mark.parametrize("case", range(40))
def test_holm_adjusted_p_values_reject_exactly_what_the_step_down_procedure_rejects(case):
    rng = np.random.default_rng(case)
    p_values = rng.choice([rng.uniform(0, 0.2), rng.uniform(0, 1)], size=int(rng.integers(1, 9)))  # ties too
    p_values = np.where(rng.random(len(p_values)) < 0.5, rng.uniform(0, 0.06, len(p_values)), p_values)
    adjusted = holm(p_values)
    assert np.all(adjusted >= p_values) and np.all(adjusted <= 1)
    for alpha in (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, *p_values):  # the p-values themselves: boundaries
        assert set(np.flatnonzero(adjusted <= alpha + 1e-15)) == holm_step_down(p_values, alpha), alpha


def test_holm_on_a_textbook_case_and_its_intervals_agree_with_its_decisions():
    p_values = np.array([0.01, 0.04, 0.03, 0.005])  # sorted: 0.005·4, 0.01·3, 0.03·2, 0.04·1
    assert holm(p_values) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(holm([0.01, np.nan])[1]) and holm([0.01, np.nan])[0] == pytest.approx(0.01)
    levels = holm_confidence(p_values, holm(p_values), 0.95)
    assert levels[3] == pytest.approx(1 - 0.05 / 4) and levels[0] == pytest.approx(1 - 0.05 / 3)
    # an interval at level 1 - a excludes 0 iff p <= a: here iff the adjusted p is <= 0.05
    assert list(p_values <= 1 - levels) == list(holm(p_values) <= 0.05)


def test_probability_of_improvement_counts_paired_runs_with_ties_half():
    # 2 encoder seeds × 2 label seeds: wins, wins, a tie, a loss: (1 + 1 + 0.5 + 0) / 4
    result = compare([0, 0, 1, 1], [0, 1, 0, 1], [1.0, 2.0, 0.0, -1.0])
    assert result.improvement == pytest.approx(0.625)
    assert result.difference == pytest.approx(0.5)
    assert 0 <= result.improvement_low <= 0.625 <= result.improvement_high <= 1
    always = compare([0, 0, 1, 1], [0, 1, 0, 1], [1.0, 2.0, 3.0, 0.5])
    # every resample agrees, yet 4 won runs are not certainty: Wilson's interval over them is the floor
    z = stats.norm.ppf(0.975)
    assert always.improvement == 1.0 and always.improvement_high == 1.0
    assert always.improvement_low == pytest.approx(4 / (4 + z**2))


def test_with_one_encoder_seed_the_interval_is_students_t_over_the_label_seeds():
    """Conditional on one encoder, without test images, the interval is the textbook t over the label seeds: the
    bootstrap's variance (low by (L − 1)/L) is scaled back and the quantile takes L − 1 degrees of freedom."""
    differences = [0.5, 1.5, 1.0, 3.0, -0.5]
    result = compare([7] * 5, range(5), differences)
    textbook = stats.t.interval(0.95, 4, loc=np.mean(differences), scale=stats.sem(differences))
    assert result.df == 4
    assert (result.low + result.high) / 2 == pytest.approx(np.mean(differences))
    # the half-width within the bootstrap's own noise (2,000 resamples: about 2% of a standard error)
    assert (result.high - result.low) == pytest.approx(textbook[1] - textbook[0], rel=0.05)


def test_per_image_differences_add_the_test_image_level_and_decide_each_pair():
    """Per pair, 4 test images; pair means +25, -25, 0, +50 points."""
    per_image = np.array([[100, 0, 0, 0], [0, -100, 0, 0], [100, -100, 0, 0], [100, 100, 0, 0]], dtype=float)
    result = compare([0, 0, 1, 1], [0, 1, 0, 1], per_image.mean(axis=1), per_image)
    assert result.difference == pytest.approx(12.5)
    assert result.improvement == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert result.design.describe() == "2 encoder seeds × 2 label seeds, 4 test images"
    blind = compare([0, 0, 1, 1], [0, 1, 0, 1], per_image.mean(axis=1))
    assert blind.design.describe() == "2 encoder seeds × 2 label seeds, test images not kept"


def test_paired_results_that_kept_their_correctness_are_resampled_over_test_images():
    def frame(correct: list[list[int]], accuracy_shift: float) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "encoder_seed": [0, 0, 1],
                "seed": [0, 1, 0],
                CORRECT: correct,
                "accuracy": [np.mean(c) * 100 + accuracy_shift for c in correct],
            }
        )

    mine = frame([[1, 1, 0], [1, 0, 1], [1, 1, 1]], 0)
    theirs = frame([[1, 0, 0], [1, 0, 1], [0, 1, 1]], 0)
    row = paired_stats(mine, theirs)
    assert row["resampled"] == "2 encoder seeds × 2 label seeds, 3 test images"
    assert row["difference"] == pytest.approx(np.mean([100 / 3, 0, 100 / 3]))
    assert row["W/T/L"] == "2/1/0"
    row = paired_stats(mine.drop(columns=CORRECT), theirs)  # one side did not keep them: no test-image level
    assert row["resampled"].endswith("test images not kept")


@pytest.mark.parametrize(
    ("encoder_seeds", "label_seeds", "text"),
    [
        ([0, 0, 0], [0, 1, 2], "conditional on encoder seed 7: 3 label seeds, test images not kept"),
        ([0, 0, 1, 1], [0, 1, 2, 3], "2 label seeds nested in 2 encoder seeds, test images not kept"),
        ([0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1], "3 encoder seeds × 2 label seeds, test images not kept"),
    ],
)
def test_the_interval_says_what_it_resampled(encoder_seeds, label_seeds, text):
    result = compare(encoder_seeds, label_seeds, np.arange(len(encoder_seeds), dtype=float))
    assert result.design.describe("7") == text
    assert result.low < result.difference < result.high


def test_one_pair_has_no_interval_and_the_same_pairs_give_the_same_interval():
    lone = compare([0], [0], [2.0])
    assert lone.difference == 2.0 and np.isnan(lone.low) and np.isnan(lone.p_value)
    pairs = list(itertools.product(range(3), range(3)))
    differences = np.linspace(-1, 2, 9)
    first = compare(*zip(*pairs), differences)
    assert first == compare(*zip(*pairs), differences)
