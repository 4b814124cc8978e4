"""The few-label protocol on cached features, without Hydra or the store.

``fuse_once`` takes each pretext's features (``FeatureSet``), a typed fusion config, a label regime
and a seed: it draws the stratified labeled subset, screens out pretexts without label information,
chooses a pretext where the head matches pretexts, selects the head's hyper-parameters, refits it on all
labels and scores it on the test split. It returns the result record that ``sslfuse fuse`` writes.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Optional

import torch

from ssl_fusion.config import LabelsConfig, as_plain, load_option
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.data.splits import stratified_subset, subset_fields
from ssl_fusion.evaluation.metrics import macro_f1
from ssl_fusion.fusion import FUSIONS, FusionConfig
from ssl_fusion.fusion.screen import screen_pretexts
from ssl_fusion.fusion.select import SelectConfig, criterion_scores
from ssl_fusion.fusion.training import (
    Selection,
    predict_proba,
    score,
    select_hyperparameters,
    train_selected,
)


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
    """The pretexts that pass the screen (``ssl_fusion.fusion.screen``) on their plain labeled features, and the result
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
        "test_macro_f1": macro_f1(probs.argmax(1), test_labels),
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
