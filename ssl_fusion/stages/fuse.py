"""``sslfuse fuse``: train a fusion head on cached features of the labeled subset, evaluate on test."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from ssl_fusion.config import CacheConfig, LabelsConfig, check_seed
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.data.splits import EvaluationConfig
from ssl_fusion.evaluation.result import PREDICTIONS_FILE, FuseResult
from ssl_fusion.fusion import FusionConfig
from ssl_fusion.fusion.protocol import check_folds, fuse_result, head_threads
from ssl_fusion.stages import run_dir, stage_app, user_overrides
from ssl_fusion.stages.context import StageContext, open_context
from ssl_fusion.stages.methods import METHODS, lookup_method
from ssl_fusion.stages.sources import FeatureSource, declared_sources, sources_named
from ssl_fusion.stages.tracking import stage_tracker, track_fuse
from ssl_fusion.store.files import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger("sslfuse")


def fused_sources(fusion: FusionConfig, pretexts: list[str], declared: dict[str, FeatureSource]) -> list[FeatureSource]:
    """The sources a head reads (all, or ``single``'s one), checked against the known pretexts and the declared ones."""
    return sources_named(lookup_method(fusion.name).inputs(fusion, pretexts), declared)


def check_head(fusion: FusionConfig, n_pretexts: int) -> None:
    """Build the head once on dummy sizes so a bad head option is refused before any work."""
    head = lookup_method(fusion.name)
    head(fusion, [8] * (1 if head.reads_one_pretext else n_pretexts), 2)


def cached_features(
    ctx: StageContext,
    sources: list[FeatureSource],
    cache: CacheConfig,
    cache_command: str,
) -> dict[str, FeatureSet]:
    """Each source's features (``FeatureSource.load``); a UserError naming ``cache_command`` for a missing one."""
    return {source.name: source.load(ctx, cache, cache_command) for source in sources}


def evaluate_method(
    ctx: StageContext,
    fusion: FusionConfig,
    labels_cfg: LabelsConfig,
    seed: int,
    features: Callable[[], dict[str, FeatureSet]],
    evaluation: EvaluationConfig | None = None,
) -> FuseResult:
    """One result of ``fusion``, with the stage's context: a method that trains on the labeled images
    (``needs_images``, e.g. ``supervised_scratch``) gets the stage context; a head gets the cached ``features()``."""
    method = lookup_method(fusion.name)
    if method.needs_images:
        return method(fusion).evaluate(ctx, labels_cfg, seed, evaluation).in_context(run_context(ctx))
    with head_threads(ctx.overrides.num_threads):
        result = fuse_result(features(), fusion, labels_cfg, seed, evaluation, ctx.data.classes)
        return result.in_context(run_context(ctx))


def check_evaluation(node: Any) -> EvaluationConfig:
    """The ``evaluation`` options as a typed config (which checks its values); a one-line UserError for a dev seed
    out of range."""
    evaluation: EvaluationConfig = OmegaConf.to_object(node)
    check_seed("evaluation.dev_seed", evaluation.dev_seed)
    return evaluation


def check_labels(
    train_labels: torch.Tensor,
    labels_cfg: LabelsConfig,
    fusion: FusionConfig,
    seed: int,
    evaluation: EvaluationConfig | None = None,
) -> None:
    """Refuse, before any work, a label regime the dataset cannot give (outside the dev split, for ``split=dev``) or
    the head cannot cross-validate."""
    labeled = (evaluation or EvaluationConfig()).labeled(labels_cfg, train_labels, seed)
    if not lookup_method(fusion.name).needs_images:
        check_folds(fusion, train_labels[labeled])


def write_result(folder: Path, result: FuseResult) -> None:
    """The evaluation split's predictions (``predictions.npz``, when the result has them), then ``results.json`` (the
    result's record, naming that file) and a one-row ``results.csv`` of its scalars, each written atomically: a
    ``results.json`` never names a file not yet written."""
    if result.predictions is not None:
        atomic_write_bytes(folder / PREDICTIONS_FILE, result.predictions.to_bytes())
        result = dataclasses.replace(result, evaluation={**result.evaluation, "predictions_file": PREDICTIONS_FILE})
    record = result.to_record()
    atomic_write_json(folder / "results.json", record)
    flat = {k: v for k, v in record.items() if not isinstance(v, (dict, list))}
    flat["pretexts"] = "+".join(result.pretexts)
    atomic_write_text(folder / "results.csv", pd.DataFrame([flat]).to_csv(index=False))


def run_context(ctx: StageContext) -> dict[str, Any]:
    """What a result ran on (``FuseResult``'s context fields): the data by name and by content, the encoders."""
    fingerprints = ctx.fingerprints
    return {
        "dataset": ctx.dataset_cfg.name,
        "pretraining_dataset": (ctx.pretrain_dataset_cfg or ctx.dataset_cfg).name,
        "encoder": ctx.encoder_cfg.name,
        "encoder_seed": ctx.seed,
        "data_fingerprint": f"{fingerprints['train']}/{fingerprints['test']}",
        "pretraining_fingerprint": ctx.pretraining.fingerprints["train"],
    }


def cache_command(pretexts: list[str]) -> str:
    extra = user_overrides(("pretexts", "fusion", "labels", "pretext", "seed", "imported"))
    return " ".join(["sslfuse cache", f"pretexts=[{','.join(pretexts)}]", *extra])


@stage_app("fuse")
def main(cfg: DictConfig) -> None:
    tracker = stage_tracker(cfg)
    declared = declared_sources(cfg)
    pretexts = [source.name for source in sources_named(cfg.pretexts, declared)]
    fusion = METHODS.typed_config(cfg.fusion, key="fusion")
    labels_cfg: LabelsConfig = OmegaConf.to_object(cfg.labels)
    evaluation = check_evaluation(cfg.evaluation)
    used = fused_sources(fusion, pretexts, declared)
    check_head(fusion, len(used))
    ctx = open_context(cfg, cfg.encoder_seed)
    check_labels(ctx.data.train_labels, labels_cfg, fusion, cfg.seed, evaluation)
    cache: CacheConfig = OmegaConf.to_object(cfg.cache)
    command = cache_command([source.name for source in used if source.made_by_cache])

    def features() -> dict[str, FeatureSet]:
        return cached_features(ctx, used, cache, command)

    result = evaluate_method(ctx, fusion, labels_cfg, cfg.seed, features, evaluation)
    write_result(Path(run_dir()), result)
    track_fuse(tracker, fusion, result, Path(run_dir()))
    print(
        f"{result.method} with {result.labels['regime']} labels ({result.labels['n_labeled']}), seed {cfg.seed}: "
        f"{result.split} accuracy {result.accuracy:.4f}; results in {run_dir()}"
    )
