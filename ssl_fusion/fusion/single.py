"""One pretext alone (``fusion.pretext=<name>``): the per-encoder baseline every fusion is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ssl_fusion.fusion import FUSIONS, FusionHead
from ssl_fusion.fusion.concat import ConcatConfig, classifier


@dataclass
class SingleConfig(ConcatConfig):
    pretext: Optional[str] = None


@FUSIONS.register("single", SingleConfig)
class SingleFusion(FusionHead):
    """The fuse stage hands this head only the features of ``fusion.pretext``."""

    def __init__(self, cfg: SingleConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        (dim,) = feature_dims
        self.classifier = classifier(dim, cfg.hidden, num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        (only,) = features
        return self.classifier(self.feature_dropout(only))
