#!/usr/bin/env python
"""Reference row for every results table: scikit-learn's LogisticRegressionCV on the concatenated cached features of
the given pretexts, on the very labeled subsets `sslfuse fuse` draws (same `labels.*` regime, same seeds), one
results.json per seed in the shape `sslfuse fuse` writes, so `sslfuse report` tables it beside the heads.

Arguments after the options are `sslfuse fuse` overrides (dataset, pretexts, labels, artifacts_dir, ...); the
features must be cached (`sslfuse cache` with the same overrides makes them).

    .venv/bin/python scripts/reference/logreg_concat.py --seeds 0,1,2 --out outputs/reference/logreg \\
        'pretexts=[rotation,simclr,inpainting]' labels.fraction=0.01
    .venv/bin/python scripts/reference/logreg_concat.py --seeds 0,1,2 --out outputs/reference/logreg \\
        'pretexts=[rotation,simclr]' labels.per_class=10 dataset=digits
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from threadpoolctl import threadpool_limits

import ssl_fusion.stages  # noqa: F401  (registers the configs' schemas)
from ssl_fusion.config import CONF_DIR, CacheConfig, LabelsConfig
from ssl_fusion.data.splits import EvaluationConfig
from ssl_fusion.evaluation.metrics import macro_f1
from ssl_fusion.evaluation.reference import concat_logistic_regression_cv
from ssl_fusion.evaluation.result import FuseResult, Predictions
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.context import open_context
from ssl_fusion.stages.fuse import cached_features, run_context, write_result
from ssl_fusion.stages.sources import feature_sources

METHOD = "reference: logreg_cv(concat)"


def fuse_config(overrides: list[str]) -> DictConfig:
    """The config `sslfuse fuse <overrides>` runs with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="fuse", overrides=overrides)


def reference_results(cfg: DictConfig, seeds: list[int], threads: int = 1) -> list[FuseResult]:
    """One result per seed: LogisticRegressionCV on the concatenated standardised cached features of ``cfg.pretexts``
    for the labeled subset `sslfuse fuse` draws for that seed, scored on the test split, with its context as
    `sslfuse fuse` records it."""
    sources = feature_sources(cfg)
    pretexts = [source.name for source in sources]
    labels_cfg: LabelsConfig = OmegaConf.to_object(cfg.labels)
    cache: CacheConfig = OmegaConf.to_object(cfg.cache)
    ctx = open_context(cfg, cfg.encoder_seed)
    cached = ",".join(source.name for source in sources if source.made_by_cache)
    command = f"sslfuse cache pretexts=[{cached}] (and this run's dataset keys)"
    features = cached_features(ctx, sources, cache, command)
    sets = list(features.values())
    test_labels = sets[0].test_labels
    records = []
    for seed in seeds:
        labeled = labels_cfg.subset(ctx.data.train_labels, seed)
        started = time.perf_counter()
        with threadpool_limits(threads):
            fit = concat_logistic_regression_cv(sets, labeled)
        result = FuseResult(
            method=METHOD,
            title=METHOD,
            family="reference_logreg_cv",
            options={},
            pretexts=pretexts,
            labels=labels_cfg.fields(labeled, seed, ctx.data.train_labels),
            metrics={
                "test_accuracy": fit.accuracy(test_labels),
                "test_macro_f1": macro_f1(fit.predictions, test_labels),
            },
            selection={"selected_c": fit.chosen_c, "selection": "LogisticRegressionCV(cv=5)"},
            uses_all_labels=any(s.uses_labels for s in sets),
            evaluation=EvaluationConfig().record(torch.arange(len(test_labels)), test_labels),
            details={"fit_seconds": time.perf_counter() - started},
            predictions=Predictions(fit.predictions.numpy(), test_labels.numpy()),
        )
        records.append(result.in_context(run_context(ctx)))
    return records


def folder_name(result: FuseResult) -> str:
    """``<pretexts>_<regime>/seed_<seed>``, safe as a path."""
    regime = result.labels["regime"].replace("%", "pct")
    tag = re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{'+'.join(result.pretexts)}_{regime}")
    return f"{tag}/seed_{result.labels['seed']}"


def main(argv: Optional[list[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="label seeds, comma-separated (as `sslfuse fuse seed=...`)")
    parser.add_argument("--out", required=True, help="folder receiving <pretexts>_<regime>/seed_<seed>/results.json")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads of each fit")
    parser.add_argument("overrides", nargs="*", help="`sslfuse fuse` overrides: pretexts=[...] labels.per_class=10 ...")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if any("fusion" == o.partition("=")[0].lstrip("+~") or o.startswith("seed=") for o in args.overrides):
        raise UserError("give seeds with --seeds; the method is fixed (LogisticRegressionCV on the concatenation)")
    written = []
    for result in reference_results(fuse_config(args.overrides), seeds, args.threads):
        folder = Path(args.out) / folder_name(result)
        folder.mkdir(parents=True, exist_ok=True)
        write_result(folder, result)
        print(
            f"{METHOD} with {result.labels['regime']} labels ({result.labels['n_labeled']}), seed "
            f"{result.labels['seed']}: test accuracy {result.accuracy:.4f}; wrote {folder / 'results.json'}"
        )
        written.append(folder / "results.json")
    return written


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"logreg_concat: error: {err}", file=sys.stderr)
        sys.exit(2)
