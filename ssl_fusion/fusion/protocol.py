"""The few-label protocol on cached features, without Hydra or the store.

``fuse_once`` takes each pretext's features (``FeatureSet``), a typed fusion config, a label regime
and a seed: it draws the stratified labeled subset, screens out pretexts without label information,
chooses a pretext where the head matches pretexts, chooses the head's L2 strength and training length
by k-fold cross-validation on the labeled set, refits it on all labels and scores it on the evaluation split: the
test split, or with ``evaluation.split=dev`` a held-out part of the training split (``data.splits.EvaluationConfig``).
``fuse_result`` returns the typed result (``ssl_fusion.evaluation.result.FuseResult``), ``fuse_once`` its flat
record as ``sslfuse fuse`` writes it. ``fuse_arrays`` does the same from plain arrays, for a notebook.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from sklearn.preprocessing import LabelEncoder

from ssl_fusion.config import LabelsConfig, as_plain, check_seed, load_option
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.data.splits import EvaluationConfig, complement, fold_count
from ssl_fusion.evaluation.result import FuseResult, Predictions, class_names, titled
from ssl_fusion.fusion import FUSIONS, Fitted, FusionConfig, FusionMethod
from ssl_fusion.fusion.screen import screen_pretexts
from ssl_fusion.fusion.select import SelectConfig, criterion_scores
from ssl_fusion.fusion.training import (
    cross_validate,
    predict_proba,
    score,
    split_metrics,
    train_selected,
)
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.registry import Registry


def head_class(fusion: FusionConfig) -> type[FusionMethod]:
    return FUSIONS.get(fusion.name).impl


def changed_options(fusion: FusionConfig, registry: Registry = FUSIONS) -> dict[str, Any]:
    """The options of ``fusion`` (an option of ``registry``) that differ from its ``conf/fusion/<name>.yaml``, so
    that a sweep over an option gives each value its own row."""
    default, current = as_plain(load_option(registry, fusion.name)), as_plain(fusion)
    return {key: value for key, value in current.items() if value != default.get(key)}


def head_title(fusion: FusionConfig, registry: Registry = FUSIONS) -> str:
    """E.g. ``attention``, ``select[by=knn]``, ``attention[combine=concat]``: the method's title with the options
    changed from its YAML, but for those it shows in its own way (``fusion`` an option of ``registry``)."""
    method = registry.get(fusion.name).impl
    shown = {key: value for key, value in changed_options(fusion, registry).items() if key not in method.hidden_options}
    return titled(method.title(fusion), shown)


def method_title(fusion: FusionConfig, features: dict[str, FeatureSet]) -> str:
    """``head_title``, with the cached views the head trained on: ``concat[4 views]``."""
    title = head_title(fusion)
    views = next(iter(features.values())).train_views
    return title if views is None else f"{title}[{len(views)} views]"


def method_label(fusion: FusionConfig, features: dict[str, FeatureSet]) -> str:
    """``method_title`` with the pretexts: ``attention(rotation+simclr)``; a pretext trained with all labels is
    marked ``[all labels]`` (for people: the result's ``uses_all_labels`` says it)."""
    names = [f"{name}[all labels]" if fs.uses_labels else name for name, fs in features.items()]
    return f"{method_title(fusion, features)}({'+'.join(names)})"


def weights_by_class(
    weights: torch.Tensor, labels: torch.Tensor, pretexts: list[str], classes: list[str]
) -> dict[str, dict[str, float]]:
    """Mean pretext weight over the test samples of each true class, keyed by the class's name."""
    return {
        name: dict(zip(pretexts, weights[labels == c].mean(0).tolist()))
        for c, name in enumerate(classes)
        if (labels == c).any()
    }


def fit_and_predict(
    fusion: FusionConfig,
    train: list[torch.Tensor],
    labels: torch.Tensor,
    test: list[torch.Tensor],
    num_classes: int,
    seed: int,
) -> Fitted:
    """Select and refit ``fusion``'s head on the labeled features (a method that ``fits_itself`` fits its own way):
    test-set probabilities and weights, the selection, the head's number of trained parameters and the last refit's
    first and final loss."""
    dims = [f.shape[-1] for f in train]
    if head_class(fusion).fits_itself:
        return head_class(fusion)(fusion, dims, num_classes).fit_predict(train, labels, test, seed)
    heads, selection, losses = train_selected(
        lambda: head_class(fusion)(fusion, dims, num_classes), train, labels, fusion, seed
    )
    probs, weights = predict_proba(heads, test)
    parameters = sum(p.numel() for p in heads[0].parameters())
    details = {"head_parameters": parameters, "first_loss": losses[0], "final_loss": losses[-1]}
    return Fitted(probs, weights, selection.record(), details)


def choose_pretext(
    fusion: SelectConfig,
    names: list[str],
    train: list[torch.Tensor],
    labels: torch.Tensor,
    test: list[torch.Tensor],
    test_labels: torch.Tensor,
    num_classes: int,
    seed: int,
) -> tuple[int, dict[str, float]]:
    """Pretext matching: the position of the pretext that ``fusion.by`` prefers, and every pretext's score."""
    position = {name: i for i, name in enumerate(names)}

    def cv_accuracy(name: str) -> float:
        feats = [train[position[name]]]
        make_head = lambda: head_class(fusion)(fusion, [feats[0].shape[-1]], num_classes)  # noqa: E731
        return cross_validate(make_head, feats, labels, fusion, seed).accuracy

    def test_accuracy(name: str) -> float:
        i = position[name]
        return score(fit_and_predict(fusion, [train[i]], labels, [test[i]], num_classes, seed).probs, test_labels)[0]

    plain = {name: views[0] for name, views in zip(names, train)}
    scores = criterion_scores(fusion, plain, labels, seed, cv_accuracy, test_accuracy)
    return position[max(scores, key=scores.get)], scores


@contextlib.contextmanager
def head_threads(num_threads: Optional[int]) -> Iterator[None]:
    """Train heads with ``train.num_threads`` intra-op threads, one when unset: head matmuls are small, and on
    cores shared with other work extra threads mostly wait at each op's barrier."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def screened(
    pretexts: list[str], train: list[torch.Tensor], labels: torch.Tensor, seed: int
) -> tuple[list[str], dict[str, Any]]:
    """The pretexts that pass the screen (``ssl_fusion.fusion.screen``) on their plain labeled features, and the
    result fields that record it."""
    screen = screen_pretexts({name: views[0] for name, views in zip(pretexts, train)}, labels, seed)
    record = {
        "screened_out": [p for p in pretexts if p not in screen.kept],
        "screen_scores": screen.scores,
        "screen_threshold": screen.threshold,
    }
    return screen.kept, record


def with_screened_columns(weights: torch.Tensor, used: list[str], pretexts: list[str]) -> torch.Tensor:
    """Per-sample weights over all ``pretexts`` (samples, pretexts) from weights over the ``used`` ones: a pretext
    the screen left out has weight 0."""
    full = torch.zeros(len(weights), len(pretexts))
    full[:, [pretexts.index(p) for p in used]] = weights
    return full


def check_folds(fusion: FusionConfig, labels: torch.Tensor) -> None:
    """Refuse a method that needs cross-validation when a class has a single labeled image."""
    if head_class(fusion).needs_cross_validation(fusion) and fold_count(labels, fusion.folds) == 0:
        raise UserError(
            f"fusion={fusion.name} ({head_class(fusion).title(fusion)}) needs cross-validation, and a class has a "
            "single labeled "
            "image; give labels.per_class >= 2, or fusion.by=logme"
        )


def head_inputs(fusion: FusionConfig, features: dict[str, FeatureSet]) -> dict[str, FeatureSet]:
    """The feature sets ``fusion``'s head reads, of those given; a UserError naming a missing one."""
    wanted = head_class(fusion).inputs(fusion, list(features))
    missing = [name for name in wanted if name not in features]
    if missing:
        raise UserError(
            f"fusion={fusion.name} reads {', '.join(missing)}, which is not among the pretexts given: "
            f"{', '.join(features)}"
        )
    return {name: features[name] for name in wanted}


def refuse_unseen_classes(train_labels: np.ndarray, test_labels: np.ndarray) -> None:
    """A one-line UserError listing the test labels that no train label has (no head can predict them)."""
    unseen = np.setdiff1d(test_labels, train_labels).tolist()
    if unseen:
        shown = ", ".join(map(str, unseen[:5])) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise UserError(f"test labels hold classes never seen in train: {shown}")


def class_count(train_labels: torch.Tensor, test_labels: torch.Tensor) -> int:
    """The number of classes when labels are class indices (a dataset's 0..K-1): a UserError for a negative id or for a
    test class the train split lacks. ``fuse_arrays`` encodes any other labels first."""
    lowest = min(int(train_labels.min()), int(test_labels.min()))
    if lowest < 0:
        raise UserError(f"class ids must be >= 0, got {lowest}; fuse_arrays takes labels of any kind")
    refuse_unseen_classes(train_labels.numpy(), test_labels.numpy())
    return int(train_labels.max()) + 1


def fuse_once(
    features: dict[str, FeatureSet],
    fusion: FusionConfig,
    labels_cfg: LabelsConfig,
    seed: int,
    evaluation: Optional[EvaluationConfig] = None,
    classes: Optional[list[str]] = None,
) -> dict[str, Any]:
    """One fusion experiment (``fuse_result``) as the flat record ``sslfuse fuse`` writes, without the stage's
    context."""
    return fuse_result(features, fusion, labels_cfg, seed, evaluation, classes).to_record()


def evaluated_features(
    features: dict[str, FeatureSet], evaluation: EvaluationConfig, labeled: torch.Tensor
) -> tuple[dict[str, FeatureSet], torch.Tensor, torch.Tensor]:
    """The feature sets as the head reads them (for ``split=dev``: the dev rows as their test split, the rest as their
    train split), the ``labeled`` training indices as positions in that train split, and the evaluated images'
    indices (into the test split, or for ``split=dev`` into the training split)."""
    first = next(iter(features.values()))
    dev = evaluation.dev_rows(first.train_labels)
    if dev is None:
        return features, labeled, torch.arange(len(first.test_labels))
    rest = complement(dev, len(first.train_labels))
    return {name: fs.held_out(dev) for name, fs in features.items()}, torch.searchsorted(rest, labeled), dev


def fuse_result(
    features: dict[str, FeatureSet],
    fusion: FusionConfig,
    labels_cfg: LabelsConfig,
    seed: int,
    evaluation: Optional[EvaluationConfig] = None,
    classes: Optional[list[str]] = None,
) -> FuseResult:
    """One fusion experiment: pick the labeled subset, select and fit the head on it, score it on the evaluation split
    (``evaluation``; default: the test split). Where the feature sets carry cached augmented views, heads train on them
    too (selection scores plain features). ``classes``: the names of the class indices (the dataset's; default: the
    indices as text)."""
    evaluation = evaluation or EvaluationConfig()
    features = head_inputs(fusion, features)
    full = next(iter(features.values()))
    num_classes = class_count(full.train_labels, full.test_labels)
    classes = class_names(classes, num_classes)
    labeled = evaluation.labeled(labels_cfg, full.train_labels, seed)
    features, rows, evaluated = evaluated_features(features, evaluation, labeled)
    sets = list(features.values())
    pretexts = list(features)
    train_labels, test_labels = sets[0].train_labels, sets[0].test_labels
    labels = train_labels[rows]
    check_folds(fusion, labels)
    train = [s.labeled_rows(rows) for s in sets]
    test = [s.standardized(s.test) for s in sets]
    started = time.perf_counter()
    used, extra = pretexts, {}
    if fusion.screen and len(pretexts) > 1:
        used, extra = screened(pretexts, train, labels, seed)
        train, test = [train[pretexts.index(p)] for p in used], [test[pretexts.index(p)] for p in used]
    if head_class(fusion).chooses_pretext(fusion):
        chosen, scores = choose_pretext(fusion, used, train, labels, test, test_labels, num_classes, seed)
        extra |= {"chosen_pretext": used[chosen], "selection_scores": scores}
        train, test = [train[chosen]], [test[chosen]]
    fitted, adjusted = head_class(fusion).fit_to(fusion, len(train))
    fit = fit_and_predict(fitted, train, labels, test, num_classes, seed)
    probs, weights = fit.probs, fit.weights
    details = {
        **fit.details,
        "fit_seconds": time.perf_counter() - started,
        "fusion_config": as_plain(fusion),
        "adjusted_options": adjusted,
        **extra,
    }
    if weights is not None:
        weights = with_screened_columns(weights, used, pretexts)
        details["mean_pretext_weights"] = dict(zip(pretexts, weights.mean(0).tolist()))
        details["pretext_weights_per_class"] = weights_by_class(weights, test_labels, pretexts, classes)
    return FuseResult(
        method=method_label(fusion, features),
        title=method_title(fusion, features),
        family=fusion.name,
        options=changed_options(fusion),
        pretexts=pretexts,
        labels=labels_cfg.fields(labeled, seed, full.train_labels),
        metrics=split_metrics(evaluation.split, probs, test_labels),
        selection=fit.selection,
        uses_test=head_class(fusion).peeks_at_test(fusion),
        uses_all_labels=any(s.uses_labels for s in sets),
        cached_views=len(train[0]) - 1,
        classes=classes,
        split=evaluation.split,
        evaluation=evaluation.record(evaluated, test_labels),
        details=details,
        predictions=Predictions(probs.argmax(1).numpy(), test_labels.numpy()),
    )


def encoded_labels(train_labels: Any, test_labels: Any) -> tuple[LabelEncoder, torch.Tensor, torch.Tensor]:
    """Labels of any kind scikit-learn accepts as class indices into their sorted distinct train values, as its
    classifiers encode them; a one-line UserError for labels not one per row or a test class the train split lacks."""
    train, test = np.asarray(train_labels), np.asarray(test_labels)
    for key, labels in (("train_labels", train), ("test_labels", test)):
        if labels.ndim != 1:
            raise UserError(f"{key} must be one label per row (a 1-D array), got shape {labels.shape}")
    encoder = LabelEncoder().fit(train)
    refuse_unseen_classes(train, test)
    return encoder, *(torch.as_tensor(encoder.transform(labels), dtype=torch.long) for labels in (train, test))


def feature_set(name: str, train: Any, test: Any, train_labels: torch.Tensor, test_labels: torch.Tensor) -> FeatureSet:
    """One pretext's arrays as a ``FeatureSet``; a UserError naming the pretext when the splits do not fit together."""
    train, test = as_rows(name, train, len(train_labels), "train"), as_rows(name, test, len(test_labels), "test")
    if train.shape[1] != test.shape[1]:
        raise UserError(f"test features of '{name}' have {test.shape[1]} columns, train features {train.shape[1]}")
    return FeatureSet(train, test, train_labels, test_labels)


def as_rows(name: str, values: Any, rows: int, split: str) -> torch.Tensor:
    """``values`` as a float32 (rows, dim) tensor; a UserError naming the pretext and split when it is not one."""
    array = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    if array.dim() != 2 or len(array) != rows:
        raise UserError(
            f"{split} features of '{name}' must be (samples, dim) with {rows} rows, got shape {tuple(array.shape)}"
        )
    if not torch.isfinite(array).all():
        raise UserError(f"{split} features of '{name}' hold NaN or inf")
    return array


def fuse_arrays(
    train: Mapping[str, Any],
    train_labels: Any,
    test: Mapping[str, Any],
    test_labels: Any,
    fusion: str = "attention",
    options: Optional[Mapping[str, Any]] = None,
    fraction: Optional[float] = 0.01,
    per_class: Optional[int] = None,
    seed: int = 0,
    split: str = "test",
    dev_fraction: float = 0.1,
    dev_seed: int = 0,
) -> dict[str, Any]:
    """The whole few-label protocol on plain arrays (numpy or torch): per pretext, train features (rows aligned
    with ``train_labels``) and test features (aligned with ``test_labels``); ``fusion`` names a head and
    ``options`` overrides its ``conf/fusion/<name>.yaml``; ``fraction`` or ``per_class`` the label regime.
    ``split="dev"`` scores on a held-out ``dev_fraction`` of the train rows (drawn with ``dev_seed``, outside every
    labeled subset) instead of the test arrays, as ``evaluation.split=dev`` does.
    Returns the result record ``sslfuse fuse`` writes (``test_accuracy`` or ``dev_accuracy``, ``selected_l2``, ...).
    Features are standardised by the train split's statistics, as cached features are. Labels may be of any kind
    (strings, any integers): they are encoded as scikit-learn encodes them, and ``classes`` lists them in the order
    of the class indices (``pretext_weights_per_class`` is keyed by them as text)."""
    if set(train) != set(test) or not train:
        raise UserError(f"train and test must name the same pretexts, got {sorted(train)} and {sorted(test)}")
    check_seed("seed", seed)
    check_seed("dev_seed", dev_seed)
    evaluation = EvaluationConfig(split, dev_fraction, dev_seed)
    encoder, y_train, y_test = encoded_labels(train_labels, test_labels)
    sets = {name: feature_set(name, train[name], test[name], y_train, y_test) for name in train}
    config = FUSIONS.typed_config({**as_plain(load_option(FUSIONS, fusion)), **dict(options or {})}, key="fusion")
    labels_cfg = LabelsConfig(fraction=None if per_class is not None else fraction, per_class=per_class)
    record = fuse_once(sets, config, labels_cfg, seed, evaluation, [str(label) for label in encoder.classes_])
    return {**record, "classes": encoder.classes_.tolist()}  # the labels as given, not as text
