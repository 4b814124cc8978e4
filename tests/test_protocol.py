"""The few-label protocol: nested regimes, validation inside the labeled set, no test leakage, pretext matching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sklearn.metrics import f1_score
from test_fusion import informative_and_noise

from ssl_fusion.config import LabelsConfig, load_option
from ssl_fusion.data.splits import stratified_subset
from ssl_fusion.evaluation.metrics import macro_f1
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.protocol import fuse_once
from ssl_fusion.fusion.training import split_validation

LABELS = torch.arange(3000) % 10


def test_bigger_regime_contains_the_smaller_for_a_seed():
    for seed in range(3):
        small = set(stratified_subset(LABELS, 0.01, None, seed).tolist())
        large = set(stratified_subset(LABELS, 0.1, None, seed).tolist())
        per_class = set(stratified_subset(LABELS, None, 20, seed).tolist())
        assert small < large and small < per_class


def test_validation_part_is_inside_the_labeled_set_and_disjoint_from_the_fit_part():
    labeled_labels = LABELS[stratified_subset(LABELS, 0.1, None, 0)]
    fit, val = split_validation(labeled_labels, 0.2, seed=0)
    assert set(fit.tolist()).isdisjoint(val.tolist())
    assert sorted(fit.tolist() + val.tolist()) == list(range(len(labeled_labels)))
    assert torch.bincount(labeled_labels[val]).tolist() == [6] * 10


def test_nothing_about_the_test_labels_reaches_training_or_selection():
    features = informative_and_noise()
    scrambled = {
        name: dataclasses.replace(fs, test_labels=fs.test_labels[torch.randperm(len(fs.test_labels))])
        for name, fs in features.items()
    }
    for name in ("attention", "concat", "select"):
        cfg = load_option(FUSIONS, name)
        honest, blind = fuse_once(features, cfg, LabelsConfig(fraction=0.05), 0), fuse_once(scrambled, cfg, LabelsConfig(fraction=0.05), 0)
        for key in ("selected_l2", "selected_steps", "val_accuracy", "final_loss", "labeled_indices_sha256"):
            assert honest[key] == blind[key], (name, key)
        assert honest["test_accuracy"] > 0.9 > blind["test_accuracy"]


@pytest.mark.parametrize("criterion", ["val", "logme", "knn", "oracle"])
def test_pretext_matching_picks_the_informative_pretext(criterion):
    cfg = dataclasses.replace(load_option(FUSIONS, "select"), by=criterion, screen=False)
    result = fuse_once(informative_and_noise(), cfg, LabelsConfig(fraction=0.1), seed=0)
    assert result["chosen_pretext"] == "good"
    assert result["selection_scores"]["good"] > result["selection_scores"]["noise"]
    assert result["method"].startswith("select[oracle: uses test]" if criterion == "oracle" else f"select[by={criterion}]")
    assert result["peeks_at_test"] == (criterion == "oracle")


def test_macro_f1_matches_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=generator)
    predictions = torch.where(torch.rand(200, generator=generator) < 0.7, labels, torch.randint(0, 5, (200,), generator=generator))
    assert macro_f1(predictions, labels) == pytest.approx(f1_score(labels.numpy(), predictions.numpy(), average="macro"))
