"""Concatenate all pretexts' features and classify: linear (``hidden: 0``) or a one-hidden-layer MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead


@dataclass
class ConcatConfig(FusionConfig):
    hidden: int = 0


def classifier(in_dim: int, hidden: int, num_classes: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(in_dim, num_classes)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))


@FUSIONS.register("concat", ConcatConfig)
class ConcatFusion(FusionHead):
    def __init__(self, cfg: ConcatConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        self.classifier = classifier(sum(feature_dims), cfg.hidden, num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.feature_dropout(torch.cat(features, dim=1)))
