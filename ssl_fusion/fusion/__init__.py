"""Fusion heads over cached per-pretext features: each module is one way to combine them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from omegaconf import MISSING
from torch import nn

from ssl_fusion.runtime.registry import Registry, import_submodules


@dataclass
class FusionConfig:
    """How every head is trained (see ``ssl_fusion.fusion.training``); heads add their own fields."""

    name: str = MISSING
    steps: int = 200  # the most steps; the best length is chosen on validation
    eval_every: int = 20
    batch_size: int = 512
    lr: float = 3e-3
    l2_grid: List[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    val_fraction: float = 0.2
    restarts: int = 2
    feature_dropout: float = 0.2
    screen: bool = True  # leave out pretexts whose features show no label information (ssl_fusion.fusion.screen)


class FusionHead(nn.Module):
    """Maps the list of per-pretext feature batches (same order as ``pretexts``) to class logits."""

    def __init__(self, cfg: FusionConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def pretext_weights(self, features: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-sample weights over pretexts (batch, pretexts) for heads that have them."""
        return None

    def regularization(self) -> torch.Tensor:
        """Extra loss term added while training (e.g. an entropy penalty); zero by default."""
        return torch.zeros(())


FUSIONS: Registry[type[FusionHead]] = Registry("fusion")

import_submodules(sys.modules[__name__])
