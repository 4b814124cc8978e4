"""Scores of predictions on a labeled test split."""

from __future__ import annotations

import torch
from sklearn.metrics import f1_score


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Unweighted mean of F1 over the classes present in labels or predictions, scikit-learn's macro average: a
    class absent from both is left out, a class only predicted counts as 0."""
    return float(f1_score(labels.cpu().numpy(), predictions.cpu().numpy(), average="macro"))
