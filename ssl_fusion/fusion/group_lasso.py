"""A linear classifier over all pretexts' features whose group penalty drops the pretexts that do not pay for
themselves on the labels (the group lasso over layers of Head2Toe, Evci et al. 2022, over pretexts here).

The classifier's weight splits into one block ``W_p`` (classes x d_p) per pretext; training adds
``lambda * sum_p sqrt(d_p) ||W_p||_F`` to ``concat``'s objective (mean cross entropy + L2). The penalty grows with the
norm, not its square, so a block whose gradient on the labels stays below ``lambda * sqrt(d_p)`` in norm is set to
exactly zero, and with it the pretext: a pretext whose features let the head fit its few labels only by memorising
them (noise, labels of another task) is left out, while one that helps keeps its block. ``sqrt(d_p)`` makes a wide
block pay for its width. ``lambda = group / sqrt(n)``, n the head's training samples (``training.per_sample_scale``):
a block of pure noise starts with a gradient of norm about ``sqrt(d_p (1 - 1 / classes) / n)``, so ``group`` near 1
drops it in any label regime. ``group`` is chosen with the L2 strength by the same k-fold cross-validation
(``group_grid`` x ``l2_grid``; 0 in ``group_grid`` keeps ``concat`` among the candidates).

The penalty is applied as its proximal step, block soft-thresholding after every Adam step:
``W_p <- W_p * max(0, 1 - t_p * lambda * sqrt(d_p) / ||W_p||_F)`` with ``t_p`` the step size that moves the block
along its gradient as far as Adam's update did. A block is then held at zero exactly when its gradient (Adam's first
moment) has norm at most ``lambda * sqrt(d_p)``, the group lasso's own condition. Each pretext's weight in the result
is its share of the blocks' summed norms, the same for every sample (0 for a dropped pretext).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, List

import torch

from ssl_fusion.fusion import FUSIONS, FusionConfig
from ssl_fusion.fusion.concat import LinearFusion
from ssl_fusion.runtime.checks import Rule


@dataclass
class GroupLassoConfig(FusionConfig):
    hidden: ClassVar[int] = 0  # linear: the blocks are the classifier's columns (``LinearFusion`` reads it)
    group_grid: List[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5])  # lambda * sqrt(training samples)
    l2_grid: List[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])  # crossed with group_grid
    feature_dropout: float = 0.0  # a linear head, as ``concat``
    restarts: int = 1  # from zero and without dropout every refit is the same

    def grid(self) -> list[dict[str, float]]:
        return [{"l2": l2, "group": group} for l2 in self.l2_grid for group in self.group_grid]

    def rules(self) -> dict[str, Rule]:
        return {
            **super().rules(),
            "group_grid": Rule(lambda grid: len(grid) > 0 and min(grid) >= 0, "a non-empty list of values >= 0", [-1]),
        }


@FUSIONS.register("group_lasso", GroupLassoConfig)
class GroupLassoFusion(LinearFusion):
    """``concat``'s linear head (zero start, one stacked product for every member) with a penalty per pretext block."""

    def __init__(self, cfg: GroupLassoConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        ends = torch.tensor(feature_dims).cumsum(0).tolist()
        self.blocks = [slice(end - dim, end) for dim, end in zip(feature_dims, ends)]

    def block_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """Each pretext block's Frobenius norm (..., pretexts) of classifier weights (..., classes, features)."""
        return torch.stack([weight[..., block].flatten(-2).norm(dim=-1) for block in self.blocks], dim=-1)

    def proximal(
        self,
        params: dict[str, torch.Tensor],
        moments: dict[str, torch.Tensor],
        step_sizes: dict[str, torch.Tensor],
        strengths: dict[str, torch.Tensor],
    ) -> None:
        """Block soft-thresholding of every member's weight (members, classes, features) in place. Each block's step
        size is the one that moves it along its gradient as far as Adam's update did (``||step * grad|| / ||grad||``),
        so that the block stays at zero exactly when its gradient's norm is at most ``lambda * sqrt(d_p)``."""
        name = "classifier.weight"
        weight, gradient, moved = params[name], moments[name], step_sizes[name] * moments[name]
        norms = self.block_norms(weight)  # (members, pretexts)
        steps = self.block_norms(moved) / self.block_norms(gradient).clamp_min(1e-30)
        for p, block in enumerate(self.blocks):
            threshold = steps[:, p] * strengths["group"] * math.sqrt(block.stop - block.start)
            weight[..., block] *= (1 - threshold / norms[:, p].clamp_min(1e-30)).clamp_min(0)[:, None, None]

    def pretext_weights(self, features: list[torch.Tensor]) -> torch.Tensor:
        norms = self.block_norms(self.classifier.weight.detach())
        return (norms / norms.sum().clamp_min(1e-30)).expand(len(features[0]), -1)
