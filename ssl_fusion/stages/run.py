"""``sslfuse run``: pretrain what is missing -> cache what is missing -> fuse every method and seed -> table."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ssl_fusion.config import (
    CacheConfig,
    LabelsConfig,
    check_external,
    check_imported,
    check_names,
    load_option,
)
from ssl_fusion.data.convert import check_conversion
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.data.imported import ImportedFeatures
from ssl_fusion.data.splits import EvaluationConfig
from ssl_fusion.fusion import FusionConfig
from ssl_fusion.models.external import ExternalEncoderConfig
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.report.tables import print_table, write_report
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import run_dir, stage_app
from ssl_fusion.stages.cache import (
    ensure_external_features,
    ensure_features,
    ensure_views,
)
from ssl_fusion.stages.context import StageContext, open_context
from ssl_fusion.stages.fuse import (
    check_evaluation,
    check_head,
    check_labels,
    evaluate_method,
    external_features,
    imported_features,
    write_result,
)
from ssl_fusion.stages.methods import METHODS, lookup_method
from ssl_fusion.stages.pretrain import ensure_encoder, probe_summary
from ssl_fusion.store.artifacts import load_features, load_views, pretext_recipe

log = logging.getLogger("sslfuse")


def planned_heads(fusions: list[str], pretexts: list[str]) -> list[tuple[FusionConfig, list[str]]]:
    """Each configured fusion over all pretexts, as its head class expands it (``single``: one per pretext)."""
    heads = []
    for name in fusions:
        fusion = load_option(METHODS, name)
        heads += lookup_method(name).variants(fusion, pretexts)
    return heads


def prepare_features(
    ctx: StageContext, cfg: DictConfig, cache: CacheConfig, pretexts: list[str], imported: dict[str, ImportedFeatures],
    external: dict[str, ExternalEncoderConfig],
) -> dict[str, FeatureSet]:
    """Pretrain and cache whatever the store lacks (features, and ``cache.views`` views); each pretext's features,
    the ``imported`` ones read from their files, the ``external`` encoders' cached once."""
    features = {}
    for pretext in pretexts:
        if pretext in imported:
            features[pretext] = imported_features(ctx, pretext, imported[pretext], cache)
            print(f"{pretext:>17}: imported ({features[pretext].train.shape[1]} features)")
            continue
        if pretext in external:
            name, _, cached = ensure_external_features(ctx, pretext, external[pretext], cache.batch_size)
            features[pretext] = external_features(ctx, pretext, external[pretext], cache, "")
            print(f"{pretext:>17}: external encoder, features {'reused' if cached else 'cached'}")
            continue
        encoder_name, manifest, reused = ensure_encoder(ctx.for_pretraining(), pretext_recipe(pretext, ctx.overrides), cfg.probe)
        features_name, _, cached = ensure_features(ctx, encoder_name, cache.batch_size)
        features[pretext] = load_features(ctx.store, features_name)
        views = ""
        if cache.views:
            views_name, views_reused = ensure_views(ctx, encoder_name, cache)
            features[pretext] = dataclasses.replace(features[pretext], train_views=load_views(ctx.store, views_name))
            views = f", {cache.views} views {'reused' if views_reused else 'cached'}"
        print(f"{pretext:>17}: encoder {'reused' if reused else 'made'} ({probe_summary(manifest['metrics'])}), "
              f"features {'reused' if cached else 'cached'}{views}")
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
    imported, external = check_imported(cfg.imported, PRETEXTS), check_external(cfg.external, PRETEXTS)
    pretexts = check_names("pretexts", list(cfg.pretexts), PRETEXTS, [*imported, *external])
    heads = planned_heads(check_names("fusions", list(cfg.fusions), METHODS), pretexts)
    for fusion, used in heads:
        check_head(fusion, len(used))
    if not cfg.seeds:
        raise UserError("seeds is empty; give at least one, e.g. seeds=[0,1,2]")
    cache: CacheConfig = OmegaConf.to_object(cfg.cache)
    labels_cfg: LabelsConfig = OmegaConf.to_object(cfg.labels)
    evaluation = check_evaluation(cfg.evaluation)
    pretraining_seeds = encoder_seeds(cfg)
    out = Path(run_dir())
    for encoder_seed in pretraining_seeds:
        ctx = open_context(cfg, encoder_seed)
        check_run(ctx, cfg, heads, labels_cfg, pretexts, imported, external, evaluation)
        if len(pretraining_seeds) > 1:
            print(f"encoder seed {encoder_seed}:")
        features = prepare_features(ctx, cfg, cache, pretexts, imported, external)
        where = out / "fuse" if len(pretraining_seeds) == 1 else out / "fuse" / f"encoder_seed{encoder_seed}"
        for fusion, used in heads:
            for seed in cfg.seeds:
                result = evaluate_method(ctx, fusion, labels_cfg, seed, lambda: {p: features[p] for p in used},
                                         evaluation)
                write_result(where / result.method / f"seed{seed}", result)
                log.info("%s encoder seed %d seed %d: %s accuracy %.4f", result.method, encoder_seed, seed,
                         result.split, result.accuracy)
    table, md_path, _ = write_report(out)
    print_table(table, f"{ctx.dataset_cfg.name}: {evaluation.split} accuracy (%) of fusion heads on frozen pretext "
                       "features")
    print(f"table written to {md_path}; whole run took {time.perf_counter() - started:.0f} s")


def check_run(ctx: StageContext, cfg: DictConfig, heads: list, labels_cfg: LabelsConfig, pretexts: list[str],
              imported: dict, external: dict, evaluation: EvaluationConfig) -> None:
    """Refuse, before any work, labels a head cannot use, a conversion that cannot be done, a pretext that cannot
    run on the pretraining data."""
    for seed in cfg.seeds:
        for fusion, _ in heads:
            check_labels(ctx.data.train_labels, labels_cfg, fusion, seed, evaluation)
    check_conversion(ctx.data.channels, ctx.pretraining.channels)
    for pretext in (p for p in pretexts if p not in imported and p not in external):
        PRETEXTS.get(pretext).impl.check(pretext_recipe(pretext, ctx.overrides), ctx.pretraining)
