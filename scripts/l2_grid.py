#!/usr/bin/env python
"""Does a finer L2 grid close the gap between our linear heads and scikit-learn's ``LogisticRegressionCV(cv=5)``,
and at what cost in fit time? Cheap and offline: scikit-learn's 8x8 digits, split once into a pool the labels are
drawn from, a dev split and a test split. Two 'pretexts': the raw pixels and a fixed random projection of them.

For each label seed and regime, ``single`` (pixels) and ``concat`` (pixels + projection) are fit with the default
4-value grid (``fusion.l2_grid``) and a 13-value grid (half-decades from 1e-5 to 10, which holds the 4 values), and
``LogisticRegressionCV(cv=5)`` on the same standardised features of the same labeled subset. Every fit is scored on
the dev split (the evidence for choosing a grid) and on the test split (the record), all on one thread, in one run.

    .venv/bin/python scripts/l2_grid.py                    # writes outputs/results/l2_grid/{runs,summary}.csv
    .venv/bin/python scripts/l2_grid.py --seeds 0 --per-class 5   # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from ssl_fusion.config import LabelsConfig, load_option
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.evaluation.reference import concat_logistic_regression_cv
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.protocol import fuse_once, head_threads

GRIDS = {"4": list(load_option(FUSIONS, "concat").l2_grid), "13": np.logspace(-5, 1, 13).tolist()}
HEADS = {"single": ["pixels"], "concat": ["pixels", "projection"]}
OUT = Path("outputs/results/l2_grid")


def digits_splits(seed: int = 0) -> dict[str, dict[str, FeatureSet]]:
    """Per split name ('dev', 'test'), the two pretexts as ``FeatureSet``s whose train rows are the label pool (1,000
    images) and whose test rows are that split (398 and 399 images). The projection: 64 pixels -> 48 tanh units by
    a fixed Gaussian matrix."""
    images, labels = load_digits(return_X_y=True)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    pixels, labels = torch.as_tensor(images, dtype=torch.float32)[order], torch.as_tensor(labels)[order]
    projection = torch.tanh(pixels @ torch.randn(64, 48, generator=generator) / 32)
    pool, parts = slice(0, 1000), {"dev": slice(1000, 1398), "test": slice(1398, None)}
    return {
        split: {
            name: FeatureSet(features[pool], features[part], labels[pool], labels[part])
            for name, features in (("pixels", pixels), ("projection", projection))
        }
        for split, part in parts.items()
    }


def ours(sets: dict[str, FeatureSet], head: str, grid: list[float], labels: LabelsConfig, seed: int) -> dict:
    fusion = dataclasses.replace(load_option(FUSIONS, head), l2_grid=grid, screen=False)
    if head == "single":
        fusion = dataclasses.replace(fusion, pretext=HEADS[head][0])
    with head_threads(1):
        result = fuse_once(sets, fusion, labels, seed)
    return {"accuracy": result["test_accuracy"], "seconds": result["fit_seconds"], "l2": result["selected_l2"]}


def reference(sets: dict[str, FeatureSet], labels: LabelsConfig, seed: int) -> dict:
    features = list(sets.values())
    labeled = labels.subset(features[0].train_labels, seed)
    started = time.perf_counter()
    with threadpool_limits(1):
        fit = concat_logistic_regression_cv(features, labeled)
    return {"accuracy": fit.accuracy(features[0].test_labels), "seconds": time.perf_counter() - started, "l2": None}


def runs(seeds: list[int], per_class: list[int]) -> pd.DataFrame:
    """One row per (regime, seed, head, fit, split): accuracy, fit seconds, the L2 chosen."""
    splits, rows = digits_splits(), []
    for count in per_class:
        labels = LabelsConfig(fraction=None, per_class=count)
        for seed in seeds:
            for head, pretexts in HEADS.items():
                for split, all_sets in splits.items():
                    sets = {name: all_sets[name] for name in pretexts}
                    fits = {f"grid {name}": ours(sets, head, grid, labels, seed) for name, grid in GRIDS.items()}
                    fits["LogisticRegressionCV"] = reference(sets, labels, seed)
                    rows += [
                        {"per_class": count, "seed": seed, "head": head, "fit": fit, "split": split, **values}
                        for fit, values in fits.items()
                    ]
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per regime, head and split: each grid's mean accuracy gap to LogisticRegressionCV in points (paired by seed),
    the 13-value grid's gain over the 4-value one, and fit-time ratios."""
    wide = table.pivot_table(
        index=["per_class", "head", "split", "seed"], columns="fit", values=["accuracy", "seconds"]
    )
    accuracy, seconds = wide["accuracy"], wide["seconds"]
    per_seed = pd.DataFrame(
        {
            "gap grid 4 (points)": 100 * (accuracy["grid 4"] - accuracy["LogisticRegressionCV"]),
            "gap grid 13 (points)": 100 * (accuracy["grid 13"] - accuracy["LogisticRegressionCV"]),
            "grid 13 - grid 4 (points)": 100 * (accuracy["grid 13"] - accuracy["grid 4"]),
            "seconds grid 4": seconds["grid 4"],
            "seconds grid 13": seconds["grid 13"],
            "seconds LogisticRegressionCV": seconds["LogisticRegressionCV"],
        }
    )
    grouped = per_seed.groupby(level=["per_class", "head", "split"])
    result = grouped.mean()
    result["seeds"] = grouped.size()
    result["grid 13 better / worse / same"] = grouped["grid 13 - grid 4 (points)"].agg(
        lambda d: f"{(d > 0).sum()} / {(d < 0).sum()} / {(d == 0).sum()}"
    )
    result["time grid 13 / grid 4"] = result["seconds grid 13"] / result["seconds grid 4"]
    result["time grid 4 / LogisticRegressionCV"] = result["seconds grid 4"] / result["seconds LogisticRegressionCV"]
    return result.round(3).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--per-class", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = runs(args.seeds, args.per_class)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "runs.csv", index=False)
    result = summary(table)
    result.to_csv(args.out / "summary.csv", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(result.to_string(index=False))
    print(f"written to {args.out}/runs.csv and summary.csv")


if __name__ == "__main__":
    main()
