"""The plain average of the per-pretext projected features: the fixed-weight baseline of the weighted heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead


@dataclass
class MeanConfig(FusionConfig):
    width: int = 256


def projections(feature_dims: list[int], width: int) -> nn.ModuleList:
    """One Linear + LayerNorm per pretext to a common width, so that features of any size can be summed."""
    return nn.ModuleList(nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width)) for dim in feature_dims)


def project(projections: nn.ModuleList, features: list[torch.Tensor]) -> torch.Tensor:
    """The projected features stacked as (batch, pretexts, width)."""
    return torch.stack([proj(f) for proj, f in zip(projections, features)], dim=1)


@FUSIONS.register("mean", MeanConfig)
class MeanFusion(FusionHead):
    def __init__(self, cfg: MeanConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        self.projections = projections(feature_dims, cfg.width)
        self.classifier = nn.Linear(cfg.width, num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        projected = project(self.projections, [self.feature_dropout(f) for f in features])
        return self.classifier(projected.mean(dim=1))
