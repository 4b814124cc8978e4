"""Per-sample sigmoid gates over pretexts, squeeze-and-excitation style (Hu et al., CVPR 2018).

Each pretext's feature is projected to a common width and normalised; a small MLP on all projected
features gives one independent sigmoid gate per pretext; a linear classifier reads the sum of the
gated features. Unlike attention's softmax, the gates need not sum to one, so several pretexts can
be fully on (or all off) at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead
from ssl_fusion.fusion.mean import project, projections


@dataclass
class GateConfig(FusionConfig):
    width: int = 256
    gate_hidden: int = 64


@FUSIONS.register("gate", GateConfig)
class GateFusion(FusionHead):
    def __init__(self, cfg: GateConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        self.projections = projections(feature_dims, cfg.width)
        self.gate = nn.Sequential(
            nn.Linear(len(feature_dims) * cfg.width, cfg.gate_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.gate_hidden, len(feature_dims)),
        )
        self.classifier = nn.Linear(cfg.width, num_classes)

    def project(self, features: list[torch.Tensor]) -> torch.Tensor:
        return project(self.projections, [self.feature_dropout(f) for f in features])

    def gates_of(self, projected: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(projected.flatten(1)))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        projected = self.project(features)
        gates = self.gates_of(projected)
        return self.classifier((gates.unsqueeze(-1) * projected).sum(dim=1))

    def pretext_weights(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.gates_of(self.project(features))
