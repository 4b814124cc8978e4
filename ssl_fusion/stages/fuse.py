"""``sslfuse fuse``: train a fusion head on cached features of the labeled subset, evaluate on test."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from ssl_fusion.artifacts import FEATURES_KIND, FeatureSet, encoder_artifact, features_artifact, load_features, pretext_recipe
from ssl_fusion.config import LabelsConfig, check_names
from ssl_fusion.context import StageContext, as_plain, open_context
from ssl_fusion.errors import UserError
from ssl_fusion.fusion import FUSIONS, FusionConfig
from ssl_fusion.headtrain import fit_head, predict, standardize
from ssl_fusion.labels import regime_name, stratified_subset
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.stages import run_dir, stage_app, user_overrides
from ssl_fusion.store import atomic_write_json, atomic_write_text

log = logging.getLogger("sslfuse")


def fused_pretexts(fusion: FusionConfig, pretexts: list[str]) -> list[str]:
    """The pretexts a head reads: all of them, or for ``single`` the one named by ``fusion.pretext``."""
    if fusion.name != "single":
        return pretexts
    if fusion.pretext is None:
        raise UserError(f"fusion=single needs fusion.pretext=<name>; one of: {', '.join(pretexts)}")
    return check_names("fusion.pretext", [fusion.pretext], PRETEXTS)


def method_label(fusion: FusionConfig, pretexts: list[str]) -> str:
    return f"{fusion.name}({'+'.join(pretexts)})"


def cached_features(ctx: StageContext, pretexts: list[str], cache_command: str) -> dict[str, FeatureSet]:
    """Each pretext's cached features; a UserError naming the command that makes a missing one."""
    features = {}
    for pretext in pretexts:
        encoder_name = encoder_artifact(ctx, pretext_recipe(pretext, ctx.overrides), ctx.overrides.max_steps_per_epoch)
        name = features_artifact(ctx, encoder_name)
        if ctx.store.manifest(FEATURES_KIND, name) is None:
            raise UserError(f"no cached features for pretext '{pretext}' in '{ctx.store.root}'; make them with: {cache_command}")
        features[pretext] = load_features(ctx.store, name)
    return features


def fuse_once(features: dict[str, FeatureSet], fusion: FusionConfig, labels_cfg: LabelsConfig, seed: int) -> dict[str, Any]:
    """One fusion experiment: pick the labeled subset, fit the head, score it on the whole test split."""
    sets = list(features.values())
    train_labels, test_labels = sets[0].train_labels, sets[0].test_labels
    labeled = stratified_subset(train_labels, labels_cfg.fraction, labels_cfg.per_class, seed)
    train, test = standardize([s.train for s in sets], [s.test for s in sets])
    torch.manual_seed(seed)
    num_classes = int(train_labels.max()) + 1
    head = FUSIONS.get(fusion.name).impl(fusion, [s.train.shape[1] for s in sets], num_classes)
    started = time.perf_counter()
    losses = fit_head(head, [f[labeled] for f in train], train_labels[labeled], fusion, seed)
    predictions, weights = predict(head, test)
    result = {
        "method": method_label(fusion, list(features)),
        "fusion": fusion.name,
        "pretexts": list(features),
        "regime": regime_name(labels_cfg.fraction, labels_cfg.per_class),
        "labels_fraction": labels_cfg.fraction if labels_cfg.per_class is None else None,
        "labels_per_class": labels_cfg.per_class,
        "n_labeled": len(labeled),
        "seed": seed,
        "test_accuracy": float((predictions == test_labels).float().mean()),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "fit_seconds": time.perf_counter() - started,
        "fusion_config": as_plain(fusion),
    }
    if weights is not None:
        result["mean_pretext_weights"] = dict(zip(features, weights.mean(0).tolist()))
    return result


def write_result(folder: Path, result: dict[str, Any], context: dict[str, Any]) -> None:
    """``results.json`` and a one-row ``results.csv``, each written atomically."""
    record = {**result, **context}
    atomic_write_json(folder / "results.json", record)
    flat = {k: v for k, v in record.items() if not isinstance(v, (dict, list))}
    flat["pretexts"] = "+".join(result["pretexts"])
    atomic_write_text(folder / "results.csv", pd.DataFrame([flat]).to_csv(index=False))


def run_context(ctx: StageContext) -> dict[str, Any]:
    return {"dataset": ctx.dataset_cfg.name, "encoder": ctx.encoder_cfg.name}


def cache_command(pretexts: list[str]) -> str:
    extra = user_overrides(("pretexts", "fusion", "labels", "pretext", "seed"))
    return " ".join(["sslfuse cache", f"pretexts=[{','.join(pretexts)}]", *extra])


@stage_app("fuse")
def main(cfg: DictConfig) -> None:
    pretexts = check_names("pretexts", list(cfg.pretexts), PRETEXTS)
    fusion = FUSIONS.typed_config(cfg.fusion, key="fusion")
    labels_cfg: LabelsConfig = OmegaConf.to_object(cfg.labels)
    used = fused_pretexts(fusion, pretexts)
    ctx = open_context(cfg, cfg.encoder_seed)
    stratified_subset(ctx.data.train_labels, labels_cfg.fraction, labels_cfg.per_class, cfg.seed)
    result = fuse_once(cached_features(ctx, used, cache_command(used)), fusion, labels_cfg, cfg.seed)
    write_result(Path(run_dir()), result, run_context(ctx))
    print(f"{result['method']} with {result['regime']} labels ({result['n_labeled']}), seed {cfg.seed}: "
          f"test accuracy {result['test_accuracy']:.4f}; results in {run_dir()}")
