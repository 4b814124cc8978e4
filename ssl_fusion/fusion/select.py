"""Pretext matching: choose ONE pretext for the task, then train a linear head on it alone.

``by`` is the criterion: ``val`` (k-fold cross-validated accuracy of its head on the labeled set),
``logme`` (LogME evidence of its features on the labeled set, You et al. 2021), ``knn``
(k-fold cross-validated kNN accuracy on the labeled set) or ``oracle`` (best test accuracy:
a reference that peeks at the test set, marked as such in every table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ssl_fusion.evaluation.logme import logme_evidence
from ssl_fusion.evaluation.probe import cross_validated_knn
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.concat import LinearConfig, LinearFusion
from ssl_fusion.runtime.checks import Rule, at_least, one_of

CRITERIA = ("val", "logme", "knn", "oracle")


@dataclass
class SelectConfig(LinearConfig):
    by: str = "val"
    knn_k: int = 10
    knn_folds: int = 5

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "by": one_of(CRITERIA), "knn_k": at_least(1), "knn_folds": at_least(2)}


@FUSIONS.register("select", SelectConfig)
class SelectFusion(LinearFusion):
    """The head trained on the chosen pretext (the protocol hands it only that pretext's features)."""

    reads_one_pretext = True
    hidden_options = ("by",)

    @classmethod
    def chooses_pretext(cls, cfg: SelectConfig) -> bool:
        return True

    @classmethod
    def needs_cross_validation(cls, cfg: SelectConfig) -> bool:
        """``by=val`` ranks pretexts by their cross-validated accuracy."""
        return cfg.by == "val"

    @classmethod
    def peeks_at_test(cls, cfg: SelectConfig) -> bool:
        return cfg.by == "oracle"

    @classmethod
    def title(cls, cfg: SelectConfig) -> str:
        return "select[oracle: uses test]" if cls.peeks_at_test(cfg) else f"select[by={cfg.by}]"


def criterion_scores(
    cfg: SelectConfig,
    labeled: dict[str, torch.Tensor],
    labels: torch.Tensor,
    seed: int,
    cv_accuracy: Callable[[str], float],
    test_accuracy: Callable[[str], float],
) -> dict[str, float]:
    """Each pretext's score under ``cfg.by`` (higher is better) from its labeled features."""
    if cfg.by == "logme":
        return {name: logme_evidence(f, labels) for name, f in labeled.items()}
    if cfg.by == "knn":
        return {name: cross_validated_knn(f, labels, cfg.knn_k, cfg.knn_folds, seed) for name, f in labeled.items()}
    if cfg.by == "val":
        return {name: cv_accuracy(name) for name in labeled}
    return {name: test_accuracy(name) for name in labeled}
