"""Macro-F1 follows scikit-learn's definition: the mean over the classes seen in labels or predictions."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import f1_score

from ssl_fusion.evaluation.metrics import macro_f1


def test_a_class_absent_from_labels_and_predictions_is_left_out():
    """Class 2 of three occurs in neither labels nor predictions: it must not enter the mean as F1 = 1, so the
    score is the mean of class 0 (2/3) and class 1 (4/5), as scikit-learn's macro average gives."""
    labels = torch.tensor([0, 0, 1, 1])
    predictions = torch.tensor([0, 1, 1, 1])
    expected = f1_score(labels.numpy(), predictions.numpy(), average="macro")
    assert expected == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1(predictions, labels) == pytest.approx(expected)


def test_random_labels_match_scikit_learn():
    """Small random draws over ten classes, where some classes are missing from labels, from predictions or from
    both: the score equals scikit-learn's f1_score(average="macro") on every draw."""
    generator = torch.Generator().manual_seed(0)
    absent_from_both = 0
    for _ in range(30):
        labels = torch.randint(0, 10, (12,), generator=generator)
        noise = torch.randint(0, 10, (12,), generator=generator)
        predictions = torch.where(torch.rand(12, generator=generator) < 0.5, labels, noise)
        absent_from_both += len(set(range(10)) - set(labels.tolist()) - set(predictions.tolist())) > 0
        expected = f1_score(labels.numpy(), predictions.numpy(), average="macro")
        assert macro_f1(predictions, labels) == pytest.approx(expected)
    assert absent_from_both > 0  # the draws do exercise classes absent from both
