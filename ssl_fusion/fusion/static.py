"""One learned weight per pretext, shared by all samples: a per-dataset rather than per-sample choice.

``mode: softmax`` weights are a softmax of learned logits. ``mode: l1`` weights are non-negative and
unnormalised, with an L1 penalty that drives unhelpful pretexts to exactly zero (the lasso over
pretexts of Doersch & Zisserman, ICCV 2017). Projections, weighted sum and classifier are as in
``mean``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead
from ssl_fusion.fusion.mean import project, projections
from ssl_fusion.runtime.checks import Rule, above, one_of


@dataclass
class StaticConfig(FusionConfig):
    width: int = 256
    mode: str = "softmax"
    l1_weight: float = 0.01
    weight_lr_scale: float = 10.0

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "mode": one_of(MODES), "weight_lr_scale": above(0)}


MODES = ("softmax", "l1")


@FUSIONS.register("static", StaticConfig)
class StaticFusion(FusionHead):
    """The weights come from ``weight_lr_scale * raw`` (softmax logits, or the weights clipped at 0). Adam
    moves each scalar by about ``lr`` a step, far too little in a few hundred steps; the scale makes them
    learn that many times faster."""

    def __init__(self, cfg: StaticConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        count = len(feature_dims)
        # Both modes start from equal weights 1/pretexts.
        start = 0.0 if cfg.mode == "softmax" else 1 / (count * cfg.weight_lr_scale)
        self.raw = nn.Parameter(torch.full((count,), start))
        self.projections = projections(feature_dims, cfg.width)
        self.classifier = nn.Linear(cfg.width, num_classes)

    def weights(self) -> torch.Tensor:
        scaled = self.cfg.weight_lr_scale * self.raw
        return scaled.softmax(0) if self.cfg.mode == "softmax" else F.relu(scaled)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        projected = project(self.projections, [self.feature_dropout(f) for f in features])
        return self.classifier(torch.einsum("p,bpw->bw", self.weights(), projected))

    def pretext_weights(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.weights().expand(len(features[0]), -1)

    def regularization(self) -> torch.Tensor:
        if self.cfg.mode == "l1":
            return self.cfg.l1_weight * self.weights().sum()
        return torch.zeros(())
