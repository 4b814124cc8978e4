"""Intervals for the mean paired difference of two methods that respect how the study was randomised, the
probability of improvement, and Holm's adjustment of a family of primary comparisons (``docs/statistics.md``).

A paired difference is observed per (encoder seed, label seed) cell and, where both methods' test predictions were
kept, per test image. Three sources of variation were randomised and are resampled:

- encoder seeds (pretraining runs), the unit a claim about a method generalises over;
- label seeds, crossed with encoder seeds when the same label seeds serve every encoder (the resampled label seeds
  then serve every resampled encoder: Owen's 2007 "pigeonhole" bootstrap), nested when each encoder seed has its
  own (resampled within each encoder);
- test images, the same images for both methods and for every cell (crossed with both seeds).

With one encoder seed the encoder is not resampled: the interval is conditional on that encoder. There the
bootstrap's variance, low by (n − 1)/n for a factor of n levels (s²(L − 1)/L² over L label seeds), gets back what it
misses, and so do the shares behind the degrees of freedom: without test images the interval is Student's t over
the label seeds.

Percentile intervals from so few units under-cover, so the interval is the estimate ± a Student-t quantile times
the bootstrap standard error, on Welch–Satterthwaite degrees of freedom built from the resampled factors' level
counts (encoder seeds − 1, label seeds − 1, test images − 1). ``scripts/coverage_simulation.py`` measures its
coverage. Pure numpy/scipy/pandas: no configuration, no stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
RESAMPLES = 2000
TIE = 1e-9  # a difference this close to 0 is a tie (float rounding of equal accuracies)
BATCH = 250  # resamples per vectorised step: bounds memory at BATCH × test images weights


@dataclass(frozen=True)
class Design:
    """How the pairs of one comparison were randomised: which factors vary, and how many levels each has."""

    encoder_seeds: int
    label_seeds: int
    test_images: int  # 0: per-image results not kept, so no test-image level
    nested: bool  # each label seed under one encoder seed only

    def describe(self, encoder_seed: str | None = None) -> str:
        """What the interval resamples, in words, for the report."""
        labels = f"{self.label_seeds} label seed{'s' if self.label_seeds != 1 else ''}"
        if self.encoder_seeds == 1:
            levels = f"conditional on encoder seed {encoder_seed}: {labels}"
        else:
            join = " nested in " if self.nested else " × "
            levels = (
                f"{labels}{join}{self.encoder_seeds} encoder seeds"
                if self.nested
                else f"{self.encoder_seeds} encoder seeds{join}{labels}"
            )
        images = f", {self.test_images} test images" if self.test_images else ", test images not kept"
        return levels + images


@dataclass(frozen=True)
class Comparison:
    """Method − reference over paired runs, in the units of the differences given (accuracy points)."""

    difference: float
    standard_error: float
    df: float  # degrees of freedom of the t quantile; NaN when nothing varies
    low: float
    high: float
    p_value: float  # two-sided, of no difference, dual to the interval
    improvement: float  # P(method > reference) over paired runs, ties half
    improvement_low: float
    improvement_high: float
    design: Design


def t_bounds(estimate: float, standard_error: float, df: float, confidence: float) -> tuple[float, float]:
    """estimate ± t(df) quantile × standard error; NaN bounds when nothing varies (no df)."""
    if np.isnan(df):
        return float("nan"), float("nan")
    half = scipy_stats.t.ppf(0.5 + confidence / 2, df) * standard_error
    return estimate - half, estimate + half


def layout(encoder_seeds: np.ndarray, label_seeds: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs as a cube (encoder seed × label seed × test image; one image column when none were kept) and the
    mask of the cells observed."""
    encoders, rows = np.unique(encoder_seeds, return_inverse=True)
    labels, columns = np.unique(label_seeds, return_inverse=True)
    cube = np.zeros((len(encoders), len(labels), values.shape[1]))
    mask = np.zeros((len(encoders), len(labels)), dtype=bool)
    if mask[rows, columns].size != len(set(zip(rows, columns))):
        raise ValueError("two pairs share encoder seed and label seed")
    cube[rows, columns] = values
    mask[rows, columns] = True
    return cube, mask


def level_weights(rng: np.random.Generator, levels: int, resamples: int) -> np.ndarray:
    """How often each level is drawn in each resample (resamples × levels); all ones when there is one level."""
    if levels == 1:
        return np.ones((resamples, 1))
    return rng.multinomial(levels, np.full(levels, 1 / levels), size=resamples).astype(float)


def cell_weights(rng: np.random.Generator, mask: np.ndarray, nested: bool, resamples: int) -> np.ndarray:
    """Weight of each (encoder seed, label seed) cell per resample (resamples × E × L): encoder seeds drawn with
    replacement, and label seeds drawn once for all encoders (crossed) or within each encoder (nested)."""
    encoders = level_weights(rng, mask.shape[0], resamples)
    if not nested:
        labels = level_weights(rng, mask.shape[1], resamples)
        return encoders[:, :, None] * labels[:, None, :] * mask
    within = np.zeros((resamples, *mask.shape))
    for row, observed in enumerate(mask):
        within[:, row, observed] = level_weights(rng, int(observed.sum()), resamples)
    return encoders[:, :, None] * within


def replicates(
    cube: np.ndarray, mask: np.ndarray, nested: bool, rng: np.random.Generator, resamples: int
) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap distributions of the mean difference and of P(method > reference), each resample drawing
    encoder seeds, label seeds and test images at once. Resamples whose cells are all unobserved (possible with
    missing cells) are NaN."""
    means, improvements = [], []
    images = cube.shape[2]
    flat = cube.reshape(-1, images)
    for start in range(0, resamples, BATCH):
        size = min(BATCH, resamples - start)
        weights = cell_weights(rng, mask, nested, size).reshape(size, -1)
        per_cell = level_weights(rng, images, size) @ flat.T / images  # each cell's difference on resampled images
        wins = (per_cell > TIE) + 0.5 * (np.abs(per_cell) <= TIE)
        total = weights.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append((weights * per_cell).sum(axis=1) / total)
            improvements.append((weights * wins).sum(axis=1) / total)
    return np.concatenate(means), np.concatenate(improvements)


def factor_shares(cube: np.ndarray, mask: np.ndarray, design: Design) -> list[tuple[float, int]]:
    """Each resampled factor's plug-in share of the variance of the mean (the spread of its level means, squared
    over its level count) and its level count."""
    per_cell = np.where(mask, cube.mean(axis=2), np.nan)
    parts = []
    if design.encoder_seeds > 1:
        parts.append(np.nanmean(per_cell, axis=1))
    if design.label_seeds > 1 and not design.nested:
        parts.append(np.nanmean(per_cell, axis=0))
    if design.test_images > 1:
        parts.append(cube[mask].mean(axis=0))
    return [(float(np.var(means) / len(means)), len(means)) for means in parts]


def satterthwaite_df(shares: list[tuple[float, int]]) -> float:
    """Welch–Satterthwaite degrees of freedom of the resampled factors: each factor's share of the variance of the
    mean weighted by its level count − 1. NaN when no factor varies."""
    if not shares:
        return float("nan")
    total = sum(share for share, _ in shares)
    if total == 0:
        return float(sum(levels - 1 for _, levels in shares))  # nothing varies: any df gives a zero-width interval
    return float(total**2 / sum(share**2 / (levels - 1) for share, levels in shares))


def unbiased(shares: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """The shares scaled by n/(n − 1): the plug-in (and the bootstrap's) variance of a mean over n levels is low by
    (n − 1)/n."""
    return [(share * levels / (levels - 1), levels) for share, levels in shares]


def compare(
    encoder_seeds,
    label_seeds,
    differences,
    per_image: np.ndarray | None = None,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """Method − reference over the pairs (encoder seed, label seed, difference), with a design-aware interval and
    P(method > reference) with its interval (see the module's docstring).

    ``per_image``: optional, one row per pair of per-image differences on the same test images (for example
    ``(correct_method − correct_reference) × 100``); its row means replace ``differences``. Without it the interval
    has no test-image level. The resampling is seeded, so the same pairs always give the same interval."""
    encoder_seeds, label_seeds = np.asarray(encoder_seeds), np.asarray(label_seeds)
    values = np.asarray(differences, dtype=float)[:, None] if per_image is None else np.asarray(per_image, float)
    cube, mask = layout(encoder_seeds, label_seeds, values)
    nested = mask.shape[0] > 1 and bool((mask.sum(axis=0) == 1).all())
    design = Design(
        encoder_seeds=mask.shape[0],
        label_seeds=mask.shape[1] if not nested else int(mask.sum(1).max()),
        test_images=0 if per_image is None else values.shape[1],
        nested=nested,
    )
    difference = float(cube[mask].mean())
    tied = np.abs(cube[mask].mean(axis=1)) <= TIE
    improvement = float(np.mean((cube[mask].mean(axis=1) > TIE) + 0.5 * tied))
    shares = factor_shares(cube, mask, design)
    conditional = design.encoder_seeds == 1 and design.label_seeds > 1
    df = satterthwaite_df(unbiased(shares) if conditional else shares)
    if np.isnan(df):
        nan = float("nan")
        return Comparison(difference, nan, nan, nan, nan, nan, improvement, nan, nan, design)
    means, wins = replicates(cube, mask, nested, np.random.default_rng(seed), resamples)
    standard_error, improvement_error = float(np.nanstd(means, ddof=1)), float(np.nanstd(wins, ddof=1))
    if conditional:
        # the bootstrap's variance, like the plug-in one, is low by (n − 1)/n per factor: add back what is missing
        missing = sum(share - plain for (share, _), (plain, _) in zip(unbiased(shares), shares))
        scale = np.sqrt(1 + missing / standard_error**2) if standard_error > 0 else 1.0
        standard_error, improvement_error = standard_error * scale, improvement_error * scale
    low, high = t_bounds(difference, standard_error, df, confidence)
    improvement_low, improvement_high = improvement_bounds(
        improvement, improvement_error, df, int(mask.sum()), confidence
    )
    return Comparison(
        difference,
        standard_error,
        df,
        low,
        high,
        p_value(difference, standard_error, df),
        improvement,
        float(improvement_low),
        float(improvement_high),
        design,
    )


def wilson(share: float, count: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval for a share observed over ``count`` runs (a fractional count of wins allowed)."""
    z = scipy_stats.norm.ppf(0.5 + confidence / 2)
    centre = (share + z**2 / (2 * count)) / (1 + z**2 / count)
    half = z / (1 + z**2 / count) * np.sqrt(share * (1 - share) / count + z**2 / (4 * count**2))
    return float(centre - half), float(centre + half)


def improvement_bounds(
    improvement: float, standard_error: float, df: float, pairs: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """P(improvement)'s interval: estimate ± t × bootstrap standard error, clipped to [0, 1], and never narrower than
    Wilson's interval over the paired runs. When every resample agrees (all pairs won, say) the bootstrap spread is
    0, and 3 won pairs are not certainty."""
    low, high = np.clip(t_bounds(improvement, standard_error, df, confidence), 0, 1)
    floor_low, floor_high = wilson(improvement, pairs, confidence)
    return float(min(low, floor_low)), float(max(high, floor_high))


def p_value(estimate: float, standard_error: float, df: float) -> float:
    """Two-sided p of no difference from the t statistic; NaN when the standard error is 0 (nothing varies)."""
    if not standard_error > 0:
        return float("nan")
    return float(2 * scipy_stats.t.sf(abs(estimate) / standard_error, df))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): sorted ascending, the k-th of m is multiplied by m − k + 1,
    made non-decreasing and capped at 1. NaN p-values (no test) are left out of the family and stay NaN."""
    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p_values, np.nan)
    tested = np.flatnonzero(~np.isnan(p_values))
    order = tested[np.argsort(p_values[tested], kind="stable")]
    steps = (len(order) - np.arange(len(order))) * p_values[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1)
    return adjusted


def holm_confidence(p_values, adjusted, confidence: float = CONFIDENCE) -> np.ndarray:
    """Per comparison, the confidence of the interval that excludes 0 exactly when Holm rejects it: the level at
    which Holm's step-down tests it, 1 − α·p/p_adjusted (1 − α/(m − k + 1) at the comparison's own step)."""
    p_values, adjusted = np.asarray(p_values, float), np.asarray(adjusted, float)
    alpha = 1 - confidence
    ranks = len(p_values) - np.argsort(np.argsort(np.nan_to_num(p_values, nan=np.inf), kind="stable"))
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(p_values > 0, adjusted / p_values, ranks)
    return 1 - alpha / factor


def encoder_blind_t(differences, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """The interval the report used before: Student's t over all pairs as if independent. Kept to show, by
    simulation, how far it under-covers when pairs share encoders and label seeds."""
    differences = np.asarray(differences, dtype=float)
    mean = float(np.mean(differences))
    if len(differences) < 2:
        return mean, float("nan"), float("nan")
    low, high = t_bounds(mean, float(scipy_stats.sem(differences)), len(differences) - 1, confidence)
    return mean, low, high
