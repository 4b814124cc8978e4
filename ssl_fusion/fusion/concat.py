"""Concatenate all pretexts' features and classify: linear (``hidden: 0``) or a one-hidden-layer MLP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead


@dataclass
class ConcatConfig(FusionConfig):
    hidden: int = 0
    feature_dropout: float = 0.0  # a linear head: L2 and early stopping regularise it, as in logistic regression
    restarts: int = 1  # from zero and without dropout every refit is the same


def classifier(in_dim: int, hidden: int, num_classes: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(in_dim, num_classes)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))


class LinearFusion(FusionHead):
    """A classifier on the concatenation of the features it reads: one linear map (``hidden: 0``) or an MLP."""

    def __init__(self, cfg: ConcatConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        self.classifier = classifier(sum(feature_dims), cfg.hidden, num_classes)
        if not cfg.hidden:  # logistic regression's start: every class equally likely
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.feature_dropout(torch.cat(features, dim=1)))

    def stacked_logits(self, params: dict[str, torch.Tensor], features: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """With one linear map, every member's logits as one matrix product over the members' stacked weights."""
        if self.cfg.hidden:
            return None
        weight, bias = (
            params["classifier.weight"],
            params["classifier.bias"],
        )  # (members, classes, dim), (members, classes)
        members, classes, dim = weight.shape
        inputs = self.feature_dropout(torch.cat(features, dim=1))
        logits = inputs @ weight.reshape(members * classes, dim).T + bias.reshape(-1)
        return logits.view(len(inputs), members, classes).transpose(0, 1)


@FUSIONS.register("concat", ConcatConfig)
class ConcatFusion(LinearFusion):
    """All pretexts' features side by side."""
