"""``sslfuse fuse``: train a fusion head on cached features of the labeled subset, evaluate on test."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from ssl_fusion.artifacts import (
    FEATURES_KIND, VIEWS_KIND, FeatureSet, artifact_exists, encoder_artifact, features_artifact, load_features, load_views,
    pretext_recipe, views_artifact,
)
from ssl_fusion.config import CacheConfig, LabelsConfig, check_cache, check_names, load_option
from ssl_fusion.context import StageContext, as_plain, open_context
from ssl_fusion.errors import UserError
from ssl_fusion.fusion import FUSIONS, FusionConfig
from ssl_fusion.fusion.select import SelectConfig, criterion_scores
from ssl_fusion.headtrain import Selection, predict_proba, score, select_hyperparameters, train_selected
from ssl_fusion.labels import stratified_subset, subset_fields
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.screen import screen_pretexts
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


def check_head(fusion: FusionConfig, n_pretexts: int) -> None:
    """Build the head once on dummy sizes so a bad head option is refused before any work."""
    FUSIONS.get(fusion.name).impl(fusion, [8] * (1 if fusion.name in ("single", "select") else n_pretexts), 2)


def changed_options(fusion: FusionConfig) -> dict[str, Any]:
    """The options of ``fusion`` that differ from its ``conf/fusion/<name>.yaml``, so that a sweep over an option
    gives each value its own row (``single``'s pretext and ``select``'s criterion are shown elsewhere)."""
    default, current = as_plain(load_option(FUSIONS, fusion.name)), as_plain(fusion)
    return {key: value for key, value in current.items() if key not in ("pretext", "by") and value != default.get(key)}


def method_label(fusion: FusionConfig, features: dict[str, FeatureSet]) -> str:
    """E.g. ``attention(rotation+simclr)``, ``select[by=knn](...)``, ``attention[combine=concat](...)`` (options
    changed from the YAML), ``concat[4 views](...)``; a pretext trained with all labels is
    marked ``[all labels]`` and pretext matching that peeks at the test set ``[oracle: uses test]``."""
    names = [f"{name}[all labels]" if fs.uses_labels else name for name, fs in features.items()]
    method = fusion.name
    if fusion.name == "select":
        method += "[oracle: uses test]" if fusion.by == "oracle" else f"[by={fusion.by}]"
    changed = changed_options(fusion)
    if changed:
        method += f"[{','.join(f'{key}={value}' for key, value in changed.items())}]"
    views = next(iter(features.values())).train_views
    if views is not None:
        method += f"[{len(views)} views]"
    return f"{method}({'+'.join(names)})"


def cached_features(ctx: StageContext, pretexts: list[str], cache: CacheConfig, cache_command: str) -> dict[str, FeatureSet]:
    """Each pretext's cached features, with its ``cache.views`` augmented views when asked for; a UserError naming
    the command that makes a missing one."""
    features = {}
    for pretext in pretexts:
        encoder_name = encoder_artifact(ctx, pretext_recipe(pretext, ctx.overrides), ctx.overrides.max_steps_per_epoch)
        name = features_artifact(ctx, encoder_name)
        if not artifact_exists(ctx.store, FEATURES_KIND, name):
            raise UserError(f"no cached features for pretext '{pretext}' in '{ctx.store.root}'; make them with: {cache_command}")
        features[pretext] = with_views(ctx, load_features(ctx.store, name), encoder_name, cache, cache_command)
    return features


def with_views(ctx: StageContext, features: FeatureSet, encoder_name: str, cache: CacheConfig, cache_command: str) -> FeatureSet:
    """``features`` with the encoder's ``cache.views`` stored augmented views attached (unchanged when 0)."""
    if not cache.views:
        return features
    name = views_artifact(encoder_name, cache.views, cache.views_max_shift, ctx.fingerprints)
    if not artifact_exists(ctx.store, VIEWS_KIND, name):
        raise UserError(f"no {cache.views} cached views for '{encoder_name}' in '{ctx.store.root}'; make them with: {cache_command}")
    return dataclasses.replace(features, train_views=load_views(ctx.store, name))


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class absent from both predictions and labels counts as 1)."""
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)
    true_positive = confusion.diag().float()
    denominator = confusion.sum(0).float() + confusion.sum(1).float()
    f1 = torch.where(denominator > 0, 2 * true_positive / denominator.clamp_min(1), torch.ones(num_classes))
    return float(f1.mean())


def weights_by_class(weights: torch.Tensor, labels: torch.Tensor, pretexts: list[str], num_classes: int) -> dict[str, dict[str, float]]:
    """Mean pretext weight over the test samples of each true class."""
    return {
        str(c): dict(zip(pretexts, weights[labels == c].mean(0).tolist())) for c in range(num_classes) if (labels == c).any()
    }


def fit_and_predict(
    fusion: FusionConfig, train: list[torch.Tensor], labels: torch.Tensor, test: list[torch.Tensor], num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None, Selection, list[float]]:
    """Select and refit ``fusion``'s head on the labeled features; test-set probabilities and weights."""
    head_cls = FUSIONS.get(fusion.name).impl
    dims = [f.shape[-1] for f in train]
    heads, selection, losses = train_selected(lambda: head_cls(fusion, dims, num_classes), train, labels, fusion, seed)
    probs, weights = predict_proba(heads, test)
    return probs, weights, selection, losses


def choose_pretext(
    fusion: SelectConfig, names: list[str], train: list[torch.Tensor], labels: torch.Tensor,
    test: list[torch.Tensor], test_labels: torch.Tensor, num_classes: int, seed: int,
) -> tuple[int, dict[str, float]]:
    """Pretext matching: the position of the pretext that ``fusion.by`` prefers, and every pretext's score."""
    position = {name: i for i, name in enumerate(names)}

    def val_accuracy(name: str) -> float:
        head_cls = FUSIONS.get(fusion.name).impl
        feats = [train[position[name]]]
        return select_hyperparameters(lambda: head_cls(fusion, [feats[0].shape[-1]], num_classes), feats, labels, fusion, seed).val_accuracy

    def test_accuracy(name: str) -> float:
        i = position[name]
        probs, _, _, _ = fit_and_predict(fusion, [train[i]], labels, [test[i]], num_classes, seed)
        return score(probs, test_labels)[0]

    plain = {name: views[0] for name, views in zip(names, train)}
    scores = criterion_scores(fusion, plain, labels, seed, val_accuracy, test_accuracy)
    return position[max(scores, key=scores.get)], scores


@contextlib.contextmanager
def head_threads(num_threads: Optional[int]) -> Iterator[None]:
    """Train heads with ``train.num_threads`` intra-op threads, one when unset. Head matmuls take milliseconds,
    and on cores shared with other work extra threads mostly wait at each op's barrier: one step of four
    stacked attention heads took 2.6 s with two threads and 0.4 s with one on a busy two-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def screened(pretexts: list[str], train: list[torch.Tensor], labels: torch.Tensor, seed: int) -> tuple[list[str], dict[str, Any]]:
    """The pretexts that pass the screen (``ssl_fusion.screen``) on their plain labeled features, and the result
    fields that record it."""
    screen = screen_pretexts({name: views[0] for name, views in zip(pretexts, train)}, labels, seed)
    record = {"screened_out": [p for p in pretexts if p not in screen.kept], "screen_scores": screen.scores,
              "screen_threshold": screen.threshold}
    return screen.kept, record


def with_screened_columns(weights: torch.Tensor, used: list[str], pretexts: list[str]) -> torch.Tensor:
    """Per-sample weights over all ``pretexts`` (samples, pretexts) from weights over the ``used`` ones: a pretext
    the screen left out has weight 0."""
    full = torch.zeros(len(weights), len(pretexts))
    full[:, [pretexts.index(p) for p in used]] = weights
    return full


def fuse_once(features: dict[str, FeatureSet], fusion: FusionConfig, labels_cfg: LabelsConfig, seed: int) -> dict[str, Any]:
    """One fusion experiment: pick the labeled subset, select and fit the head on it, score it on the test split.
    Where the feature sets carry cached augmented views, heads train on them too (selection scores plain features)."""
    sets = list(features.values())
    pretexts = list(features)
    train_labels, test_labels = sets[0].train_labels, sets[0].test_labels
    labeled = stratified_subset(train_labels, labels_cfg.fraction, labels_cfg.per_class, seed)
    train = [s.labeled_rows(labeled) for s in sets]
    test = [s.standardized(s.test) for s in sets]
    num_classes = int(train_labels.max()) + 1
    started = time.perf_counter()
    used, extra = pretexts, {}
    if fusion.screen and len(pretexts) > 1:
        used, extra = screened(pretexts, train, train_labels[labeled], seed)
        train, test = [train[pretexts.index(p)] for p in used], [test[pretexts.index(p)] for p in used]
    if fusion.name == "select":
        chosen, scores = choose_pretext(fusion, used, train, train_labels[labeled], test, test_labels, num_classes, seed)
        extra |= {"chosen_pretext": used[chosen], "selection_scores": scores}
        train, test = [train[chosen]], [test[chosen]]
    probs, weights, selection, losses = fit_and_predict(fusion, train, train_labels[labeled], test, num_classes, seed)
    accuracy, nll = score(probs, test_labels)
    result = {
        "method": method_label(fusion, features),
        "uses_all_labels": any(s.uses_labels for s in sets),
        "peeks_at_test": fusion.name == "select" and fusion.by == "oracle",
        "fusion": fusion.name,
        "pretexts": pretexts,
        **subset_fields(labels_cfg.fraction, labels_cfg.per_class, labeled, seed),
        "test_accuracy": accuracy,
        "test_macro_f1": macro_f1(probs.argmax(1), test_labels, num_classes),
        "test_nll": nll,
        "selected_l2": selection.l2,
        "selected_steps": selection.steps,
        "val_accuracy": selection.val_accuracy,
        "cached_views": len(train[0]) - 1,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "fit_seconds": time.perf_counter() - started,
        "fusion_config": as_plain(fusion),
        **extra,
    }
    if weights is not None:
        weights = with_screened_columns(weights, used, pretexts)
        result["mean_pretext_weights"] = dict(zip(pretexts, weights.mean(0).tolist()))
        result["pretext_weights_per_class"] = weights_by_class(weights, test_labels, pretexts, num_classes)
    return result


def evaluate_method(
    ctx: StageContext, fusion: FusionConfig, labels_cfg: LabelsConfig, seed: int, features: Callable[[], dict[str, FeatureSet]]
) -> dict[str, Any]:
    """One result of ``fusion``: a method that trains on the labeled images (``needs_images``, e.g.
    ``supervised_scratch``) gets the stage context; a head gets the cached ``features()``."""
    method = FUSIONS.get(fusion.name).impl
    if getattr(method, "needs_images", False):
        return method(fusion).evaluate(ctx, labels_cfg, seed)
    with head_threads(ctx.overrides.num_threads):
        return fuse_once(features(), fusion, labels_cfg, seed)


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
    check_head(fusion, len(used))
    ctx = open_context(cfg, cfg.encoder_seed)
    stratified_subset(ctx.data.train_labels, labels_cfg.fraction, labels_cfg.per_class, cfg.seed)
    cache = check_cache(cfg.cache)
    result = evaluate_method(ctx, fusion, labels_cfg, cfg.seed, lambda: cached_features(ctx, used, cache, cache_command(used)))
    write_result(Path(run_dir()), result, run_context(ctx))
    print(f"{result['method']} with {result['regime']} labels ({result['n_labeled']}), seed {cfg.seed}: "
          f"test accuracy {result['test_accuracy']:.4f}; results in {run_dir()}")
