"""``sslfuse run``: pretrain what is missing -> cache what is missing -> fuse every method and seed -> table."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ssl_fusion.config import (
    CacheConfig,
    LabelsConfig,
    ProbeConfig,
    as_plain,
    check_entries,
    load_option,
    split_entry,
)
from ssl_fusion.data.convert import check_conversion
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.data.splits import EvaluationConfig
from ssl_fusion.fusion import FusionConfig
from ssl_fusion.report.tables import print_table, write_report
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import run_dir, stage_app
from ssl_fusion.stages.context import StageContext, open_context
from ssl_fusion.stages.fuse import (
    check_evaluation,
    check_head,
    check_labels,
    evaluate_method,
    write_result,
)
from ssl_fusion.stages.methods import METHODS, lookup_method
from ssl_fusion.stages.sources import FeatureSource, feature_sources
from ssl_fusion.stages.tracking import stage_tracker, track_fuse

log = logging.getLogger("sslfuse")


def head_options(overrides: list[str]) -> dict[str, Any]:
    """``head_overrides`` (``fusion.<option>=<value>``, as ``sslfuse fuse`` takes them) as {option: value}; a
    one-line UserError for an item of another form."""
    options = {}
    for item in overrides:
        key, equals, _ = item.partition("=")
        if not equals or not key.startswith("fusion.") or key.count(".") != 1:
            raise UserError(f"head_overrides: '{item}' is not fusion.<option>=<value>, e.g. fusion.screen=false")
        options |= OmegaConf.to_container(OmegaConf.from_dotlist([item]))["fusion"]
    return options


def planned_heads(
    fusions: list[str], pretexts: list[str], head_overrides: list[str] = ()
) -> list[tuple[FusionConfig, list[str]]]:
    """Each configured fusion (``attention``, or with options: ``attention[scorer=uniform]``) over all pretexts, as its
    head class expands it (``single``: one per pretext), with the options of ``head_overrides`` (``head_options``)
    set on every head where its entry does not set them: an option a head lacks is refused in one line naming it."""
    options = head_options(list(head_overrides))
    heads = []
    for entry in fusions:
        name, own = split_entry(entry)
        fusion = load_option(METHODS, name, own)
        if options:
            fusion = METHODS.typed_config({**as_plain(fusion), **options, **own}, key="head_overrides: fusion")
        heads += lookup_method(name).variants(fusion, pretexts)
    return heads


def prepare_features(
    ctx: StageContext,
    probe: ProbeConfig,
    cache: CacheConfig,
    sources: list[FeatureSource],
) -> dict[str, FeatureSet]:
    """Each source's features, what the store lacks made first (``FeatureSource.ensure``); a line for each."""
    features = {}
    for source in sources:
        features[source.name], done = source.ensure(ctx, cache, probe)
        print(f"{source.name:>17}: {done}")
    return features


def encoder_seeds(cfg: DictConfig) -> list[int]:
    """``encoder_seeds`` (distinct), else the one ``encoder_seed``."""
    seeds = list(cfg.encoder_seeds) or [cfg.encoder_seed]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"encoder_seeds lists a seed more than once: {seeds}")
    return seeds


@stage_app("run")
def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    tracker = stage_tracker(cfg)
    sources = feature_sources(cfg)
    pretexts = [source.name for source in sources]
    check_entries("fusions", list(cfg.fusions), METHODS)
    heads = planned_heads(list(cfg.fusions), pretexts, list(cfg.head_overrides))
    for fusion, used in heads:
        check_head(fusion, len(used))
    if not cfg.seeds:
        raise UserError("seeds is empty; give at least one, e.g. seeds=[0,1,2]")
    cache: CacheConfig = OmegaConf.to_object(cfg.cache)
    for source in sources:
        source.check_views(cache, "fuse")
    labels_cfg: LabelsConfig = OmegaConf.to_object(cfg.labels)
    evaluation = check_evaluation(cfg.evaluation)
    pretraining_seeds = encoder_seeds(cfg)
    out = Path(run_dir())
    with tracker.parent(f"run {out.parent.name}/{out.name}", "run", run_params(cfg, pretexts, pretraining_seeds)):
        for encoder_seed in pretraining_seeds:
            ctx = open_context(cfg, encoder_seed, tracker=tracker)
            check_run(ctx, cfg, heads, labels_cfg, sources, evaluation)
            if len(pretraining_seeds) > 1:
                print(f"encoder seed {encoder_seed}:")
            features = prepare_features(ctx, cfg.probe, cache, sources)
            where = out / "fuse" if len(pretraining_seeds) == 1 else out / "fuse" / f"encoder_seed{encoder_seed}"
            for fusion, used in heads:
                for seed in cfg.seeds:
                    result = evaluate_method(
                        ctx, fusion, labels_cfg, seed, lambda: {p: features[p] for p in used}, evaluation
                    )
                    folder = where / result.method / f"seed{seed}"
                    write_result(folder, result)
                    track_fuse(tracker, fusion, result, folder)
                    log.info(
                        "%s encoder seed %d seed %d: %s accuracy %.4f",
                        result.method,
                        encoder_seed,
                        seed,
                        result.split,
                        result.accuracy,
                    )
        table, md_path, csv_path = write_report(out)
        tracker.log_artifacts([md_path, csv_path])
    print_table(
        table, f"{ctx.dataset_cfg.name}: {evaluation.split} accuracy (%) of fusion heads on frozen pretext features"
    )
    print(f"table written to {md_path}; whole run took {time.perf_counter() - started:.0f} s")


def run_params(cfg: DictConfig, pretexts: list[str], pretraining_seeds: list[int]) -> dict[str, Any]:
    """What a run's parent run records as params: the command line's overrides, and what it fuses."""
    return {
        "overrides": " ".join(HydraConfig.get().overrides.task),
        "dataset": cfg.dataset.name,
        "pretexts": "+".join(pretexts),
        "fusions": ",".join(cfg.fusions),
        "seeds": list(cfg.seeds),
        "encoder_seeds": pretraining_seeds,
    }


def check_run(
    ctx: StageContext,
    cfg: DictConfig,
    heads: list,
    labels_cfg: LabelsConfig,
    sources: list[FeatureSource],
    evaluation: EvaluationConfig,
) -> None:
    """Refuse, before any work, labels a head cannot use (outside the dev split, for ``evaluation.split=dev``), a
    conversion that cannot be done, a source that cannot run (``FeatureSource.check``: e.g. a pretext on the
    pretraining data)."""
    for seed in cfg.seeds:
        for fusion, _ in heads:
            check_labels(ctx.data.train_labels, labels_cfg, fusion, seed, evaluation)
    check_conversion(ctx.data.channels, ctx.pretraining.channels)
    for source in sources:
        source.check(ctx)
