"""The few-label protocol: nested regimes, k-fold selection inside the labeled set, no test leakage, pretext matching,
the protocol on plain arrays."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from test_fusion import CHANCE, informative_and_noise, standard_error

from ssl_fusion.config import LabelsConfig, load_option
from ssl_fusion.data.splits import fold_count, stratified_folds, stratified_subset
from ssl_fusion.evaluation.metrics import macro_f1
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.concat import ConcatConfig, ConcatFusion
from ssl_fusion.fusion.protocol import fuse_arrays, fuse_once
from ssl_fusion.fusion.training import HeadStack, cross_validate, fit_stack
from ssl_fusion.runtime.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = torch.arange(3000) % 10


def test_bigger_regime_contains_the_smaller_for_a_seed():
    for seed in range(3):
        small = set(stratified_subset(LABELS, 0.01, None, seed).tolist())
        large = set(stratified_subset(LABELS, 0.1, None, seed).tolist())
        per_class = set(stratified_subset(LABELS, None, 20, seed).tolist())
        assert small < large and small < per_class


def test_folds_are_stratified_and_hold_out_every_labeled_sample_once():
    """Each fold holds every class in equal share, and the folds partition the labeled set."""
    labeled_labels = LABELS[stratified_subset(LABELS, None, 5, 0)]
    fold_of = stratified_folds(labeled_labels, 5, seed=0)
    assert sorted(fold_of.tolist()) == sorted(list(range(5)) * 10)
    for fold in range(5):
        assert torch.bincount(labeled_labels[fold_of == fold], minlength=10).tolist() == [1] * 10
    assert not torch.equal(fold_of, stratified_folds(labeled_labels, 5, seed=1))


@pytest.mark.parametrize(("per_class", "folds"), [(2, 2), (3, 3), (5, 5), (20, 5)])
def test_fewer_folds_when_a_class_has_fewer_labels_than_folds(per_class, folds):
    labeled_labels = LABELS[stratified_subset(LABELS, None, per_class, 0)]
    assert fold_count(labeled_labels, 5) == folds
    assert int(stratified_folds(labeled_labels, 5, 0).max()) + 1 == folds


def test_one_label_per_class_trains_on_a_fixed_setting_recorded_in_the_result():
    """With one labeled image per class nothing can be held out: the head trains on every label with the grid's
    largest L2 for all ``steps`` (no empty fit part, no selection), and the result says so. On seed 0 it reaches 0.40
    on 2,000 test images, over 20 standard errors above chance (0.20)."""
    cfg = load_option(FUSIONS, "concat")
    assert fold_count(LABELS[stratified_subset(LABELS, None, 1, 0)], 5) == 0
    result = fuse_once(informative_and_noise(), cfg, LabelsConfig(fraction=None, per_class=1), 0)
    assert (result["folds"], result["cv_accuracy"], result["n_labeled"]) == (0, None, 5)
    assert (result["selected_l2"], result["selected_steps"]) == (max(cfg.l2_grid), cfg.steps)
    assert result["selection"].startswith("fixed")
    assert result["test_accuracy"] > 0.3


def test_pretext_matching_by_cross_validation_is_refused_with_one_label_per_class():
    with pytest.raises(UserError, match=r"select\[by=val\]\) needs cross-validation.*fusion\.by=logme") as refused:
        fuse_once(informative_and_noise(), load_option(FUSIONS, "select"), LabelsConfig(fraction=None, per_class=1), 0)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("per_class", [2, 5])
def test_few_labels_per_class_give_a_result_from_every_fold(per_class):
    result = fuse_once(
        informative_and_noise(), load_option(FUSIONS, "concat"), LabelsConfig(fraction=None, per_class=per_class), 0
    )
    assert result["folds"] == per_class and result["n_labeled"] == 5 * per_class
    # the cross-validated accuracy counts every labeled image once: a multiple of 1 / n_labeled
    assert result["cv_accuracy"] * result["n_labeled"] == pytest.approx(
        round(result["cv_accuracy"] * result["n_labeled"])
    )


def test_the_stacked_cross_validation_equals_each_fold_trained_alone():
    """The folds' heads train as one stacked model whose loss weighs only each member's training folds. Training the
    head of each fold alone, on its training rows only, from the same initialisation, gives the same held-out
    predictions: so no held-out label reaches its head, and the cross-validated accuracy is an honest one."""
    features = informative_and_noise()["good"]
    labeled = stratified_subset(features.train_labels, 0.1, None, 0)
    train, labels = features.labeled_rows(labeled), features.train_labels[labeled]
    cfg = ConcatConfig(name="concat", l2_grid=[1e-3], steps=30, eval_every=30, feature_dropout=0.0)
    make_head = lambda: ConcatFusion(cfg, [train.shape[-1]], 5)  # noqa: E731
    stacked = cross_validate(make_head, [train], labels, cfg, seed=0)
    fold_of = stratified_folds(labels, cfg.folds, 0)
    correct = 0
    for fold in range(cfg.folds):
        torch.manual_seed(0)
        alone = HeadStack([make_head()])
        keep = fold_of != fold
        fit_stack(alone, [train[:, keep]], labels[keep], cfg, torch.tensor([1e-3]), cfg.steps, seed=0)
        predicted = alone.logits([train[0, ~keep]])[0].argmax(1)
        correct += int((predicted == labels[~keep]).sum())
    assert stacked.steps == 30 and stacked.folds == 5
    assert stacked.accuracy == pytest.approx(correct / len(labels))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("eval_every", 500, r"fusion\.eval_every must be in \[1, fusion\.steps\]"),
        ("l2_grid", [], r"fusion\.l2_grid must be a non-empty list"),
        ("restarts", 0, r"fusion\.restarts must be >= 1"),
        ("folds", 1, r"fusion\.folds must be >= 2"),
        ("steps", 0, r"fusion\.steps must be >= 1"),
    ],
)
def test_head_options_out_of_range_are_refused_in_one_line_naming_the_key(option, value, message):
    with pytest.raises(UserError, match=message):
        FUSIONS.typed_config({"name": "attention", option: value}, key="fusion")


def test_moe_top_k_is_capped_with_the_reason_when_the_screen_leaves_fewer_pretexts():
    """``moe`` with ``top_k: 2`` over a good and a noise pretext: the screen leaves one, and the head is fit with
    ``top_k`` 1 and the cap recorded instead of refusing options the user set right."""
    result = fuse_once(informative_and_noise(), load_option(FUSIONS, "moe"), LabelsConfig(fraction=0.1), 0)
    assert result["screened_out"] == ["noise"]
    assert "capped from 2 to 1" in result["adjusted_options"]["top_k"]


def test_the_protocol_runs_on_plain_numpy_arrays_as_on_feature_sets():
    """``fuse_arrays`` is ``fuse_once`` on numpy arrays: the same result for the same features, labels and seed."""
    features = informative_and_noise()
    arrays = {name: fs.train.numpy() for name, fs in features.items()}
    tests = {name: fs.test.numpy() for name, fs in features.items()}
    good = features["good"]
    from_arrays = fuse_arrays(
        arrays, good.train_labels.numpy(), tests, good.test_labels.numpy(), "concat", fraction=0.05, seed=1
    )
    from_sets = fuse_once(features, load_option(FUSIONS, "concat"), LabelsConfig(fraction=0.05), 1)
    for key in (
        "test_accuracy",
        "selected_l2",
        "selected_steps",
        "cv_accuracy",
        "screened_out",
        "labeled_indices_sha256",
    ):
        assert from_arrays[key] == from_sets[key], key


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"good": np.zeros((10, 4))}, r"train features of 'good' must be \(samples, dim\) with 600 rows"),
        ({"good": np.full((600, 4), np.nan)}, r"train features of 'good' hold NaN or inf"),
    ],
)
def test_arrays_of_the_wrong_shape_or_with_nan_are_refused_naming_the_pretext(train, message):
    good = informative_and_noise()["good"]
    with pytest.raises(UserError, match=message):
        fuse_arrays(train, good.train_labels.numpy(), {"good": good.test.numpy()}, good.test_labels.numpy(), "concat")


def test_nothing_about_the_test_labels_reaches_training_or_selection():
    """Scrambling the test labels changes nothing the protocol chooses or trains, only the score: with the true labels
    each head is above 0.5 on 30 labels (0.69-0.72 measured), more than 30 standard errors above chance; with the
    scrambled ones, which no prediction can follow, it is within 4 standard errors (3.6 points) of chance (0.2)."""
    features = informative_and_noise()
    shuffle = torch.randperm(len(features["good"].test_labels), generator=torch.Generator().manual_seed(0))
    scrambled = {name: dataclasses.replace(fs, test_labels=fs.test_labels[shuffle]) for name, fs in features.items()}
    for name in ("attention", "concat", "select"):
        cfg = load_option(FUSIONS, name)
        honest, blind = (
            fuse_once(features, cfg, LabelsConfig(fraction=0.05), 0),
            fuse_once(scrambled, cfg, LabelsConfig(fraction=0.05), 0),
        )
        for key in ("selected_l2", "selected_steps", "cv_accuracy", "final_loss", "labeled_indices_sha256"):
            assert honest[key] == blind[key], (name, key)
        assert honest["test_accuracy"] > 0.5, (name, honest["test_accuracy"])
        assert abs(blind["test_accuracy"] - CHANCE) < 4 * standard_error(CHANCE), (name, blind["test_accuracy"])


@pytest.mark.parametrize("criterion", ["val", "logme", "knn", "oracle"])
def test_pretext_matching_picks_the_informative_pretext(criterion):
    cfg = dataclasses.replace(load_option(FUSIONS, "select"), by=criterion, screen=False)
    result = fuse_once(informative_and_noise(), cfg, LabelsConfig(fraction=0.1), seed=0)
    assert result["chosen_pretext"] == "good"
    assert result["selection_scores"]["good"] > result["selection_scores"]["noise"]
    assert result["method"].startswith(
        "select[oracle: uses test]" if criterion == "oracle" else f"select[by={criterion}]"
    )
    assert result["uses_test"] == (criterion == "oracle")


def test_macro_f1_matches_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=generator)
    predictions = torch.where(
        torch.rand(200, generator=generator) < 0.7, labels, torch.randint(0, 5, (200,), generator=generator)
    )
    assert macro_f1(predictions, labels) == pytest.approx(
        f1_score(labels.numpy(), predictions.numpy(), average="macro")
    )
