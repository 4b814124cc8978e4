#!/usr/bin/env python
"""How often do the report's paired intervals cover the true difference? Simulated studies with a known truth:
each (encoder seed, label seed, test image) difference of two methods is

    true difference + encoder effect + label-seed effect (crossed: shared by every encoder seed)
    + encoder × label-seed interaction + test-image effect (shared by every run) + per-run image noise,

all Gaussian with known spreads (accuracy points). The truth is the mean over the populations of encoders, label
subsets and test images, so an interval covers it only if it accounts for all three. Per design (encoder seeds ×
label seeds), over many studies, it measures the coverage and mean width at nominal 95% of:

- ``design-aware``: ``statistics.compare`` with the per-image differences (encoder seeds, label seeds, images);
- ``design-aware, images not kept``: ``statistics.compare`` on the per-pair means only;
- ``encoder-blind t``: Student's t over all pairs as if independent (the report's interval before);
- ``t on encoder means``: Student's t over the per-encoder-seed means, E − 1 df.

    .venv/bin/python scripts/coverage_simulation.py       # writes outputs/results/coverage_simulation/coverage.csv
    .venv/bin/python scripts/coverage_simulation.py --studies 50 --designs 5x5   # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from ssl_fusion.report.statistics import compare, encoder_blind_t

OUT = Path("outputs/results/coverage_simulation")


@dataclass(frozen=True)
class Truth:
    """The known spreads of the simulated studies (accuracy points) and the true difference."""

    difference: float = 1.0
    encoder: float = 1.0
    label: float = 0.5
    interaction: float = 0.3
    image: float = 10.0  # a test image's lasting advantage for one method, the same in every run
    noise: float = 20.0  # a run's own per-image disagreement
    images: int = 450  # digits' test split


def simulate_study(rng: np.random.Generator, encoders: int, labels: int, truth: Truth) -> tuple[np.ndarray, ...]:
    """One study: the encoder seeds and label seeds of its E × L pairs, and their per-image differences
    (pairs × images)."""
    encoder = rng.normal(0, truth.encoder, encoders)[:, None, None]
    label = rng.normal(0, truth.label, labels)[None, :, None]
    interaction = rng.normal(0, truth.interaction, (encoders, labels, 1))
    image = rng.normal(0, truth.image, truth.images)[None, None, :]
    noise = rng.normal(0, truth.noise, (encoders, labels, truth.images))
    cube = truth.difference + encoder + label + interaction + image + noise
    encoder_seeds, label_seeds = np.meshgrid(np.arange(encoders), np.arange(labels), indexing="ij")
    return encoder_seeds.ravel(), label_seeds.ravel(), cube.reshape(encoders * labels, truth.images)


def intervals(
    encoder_seeds: np.ndarray, label_seeds: np.ndarray, per_image: np.ndarray, resamples: int
) -> dict[str, tuple[float, float]]:
    """Each method's 95% interval on one study."""
    per_pair = per_image.mean(axis=1)
    with_images = compare(encoder_seeds, label_seeds, per_pair, per_image, resamples=resamples)
    without = compare(encoder_seeds, label_seeds, per_pair, resamples=resamples)
    encoder_means = pd.Series(per_pair).groupby(encoder_seeds).mean().to_numpy()
    half = scipy_stats.t.ppf(0.975, len(encoder_means) - 1) * scipy_stats.sem(encoder_means)
    return {
        "design-aware": (with_images.low, with_images.high),
        "design-aware, images not kept": (without.low, without.high),
        "encoder-blind t": encoder_blind_t(per_pair)[1:],
        "t on encoder means": (encoder_means.mean() - half, encoder_means.mean() + half),
    }


def coverage(
    encoders: int, labels: int, studies: int, seed: int = 0, truth: Truth = Truth(), resamples: int = 1000
) -> pd.DataFrame:
    """Per method: the share of ``studies`` simulated studies whose interval holds the true difference, and the
    mean width. Seeded: the same arguments give the same table."""
    rng = np.random.default_rng(seed)
    rows = []
    for study in range(studies):
        for method, (low, high) in intervals(*simulate_study(rng, encoders, labels, truth), resamples).items():
            rows.append({"method": method, "covered": low <= truth.difference <= high, "width": high - low})
    table = pd.DataFrame(rows).groupby("method", sort=False).agg(coverage=("covered", "mean"), width=("width", "mean"))
    return table.reset_index().assign(encoder_seeds=encoders, label_seeds=labels, studies=studies, nominal=0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--designs", default="5x5,3x3,2x3,10x5", help="encoder seeds x label seeds, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    arguments = parser.parse_args()
    designs = [tuple(int(n) for n in design.split("x")) for design in arguments.designs.split(",")]
    table = pd.concat(
        [coverage(encoders, labels, arguments.studies, arguments.seed) for encoders, labels in designs],
        ignore_index=True,
    )
    arguments.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(arguments.out / "coverage.csv", index=False)
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print(f"wrote {arguments.out / 'coverage.csv'}")


if __name__ == "__main__":
    main()
