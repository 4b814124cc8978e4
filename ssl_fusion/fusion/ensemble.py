"""One linear classifier per pretext; the prediction is the average of their class probabilities.

``forward`` returns the log of that average, so the cross entropy the trainer minimises is the
negative log-likelihood of the averaged prediction (the mixture), not the mean of each member's own
loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead


@dataclass
class EnsembleConfig(FusionConfig):
    """No fields of its own: each member is a linear classifier on one pretext's features."""


@FUSIONS.register("ensemble", EnsembleConfig)
class EnsembleFusion(FusionHead):
    def __init__(self, cfg: EnsembleConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        self.classifiers = nn.ModuleList(nn.Linear(dim, num_classes) for dim in feature_dims)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        log_probs = torch.stack(
            [F.log_softmax(c(self.feature_dropout(f)), dim=1) for c, f in zip(self.classifiers, features)], dim=1
        )
        return torch.logsumexp(log_probs, dim=1) - math.log(len(self.classifiers))
