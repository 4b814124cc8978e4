"""Scores of predictions on a labeled test split."""

from __future__ import annotations

import torch


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class absent from both predictions and labels counts as 1)."""
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)
    true_positive = confusion.diag().float()
    denominator = confusion.sum(0).float() + confusion.sum(1).float()
    f1 = torch.where(denominator > 0, 2 * true_positive / denominator.clamp_min(1), torch.ones(num_classes))
    return float(f1.mean())
