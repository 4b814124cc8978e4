"""Per-sample attention over pretexts as the paper describes it (arXiv 2204.05248); ``attention`` is the default.

Each pretext's feature is projected to a common width and normalised; a scorer gives one score per
pretext per sample; a softmax over pretexts weights the projected features; a linear classifier
reads their weighted sum (``combine: sum``). With ``combine: concat`` the weights scale each
pretext's own (unprojected) features instead, times the number of pretexts, and a linear classifier
reads their concatenation: equal weights give exactly the ``concat`` head, so the attention only has
to learn where to depart from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead
from ssl_fusion.fusion.attention import softmax_dropping_pretexts
from ssl_fusion.fusion.mean import project, projections
from ssl_fusion.runtime.checks import Rule, one_of


@dataclass
class PaperAttentionConfig(FusionConfig):
    width: int = 256
    scorer_hidden: int = 64
    query: str = "sample"
    temperature: float = 1.0
    entropy_weight: float = 0.0
    pretext_dropout: float = 0.0
    combine: str = "sum"

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "query": one_of(QUERIES), "combine": one_of(COMBINES)}


QUERIES = ("sample", "task")
COMBINES = ("sum", "concat")


@FUSIONS.register("paper_attention", PaperAttentionConfig)
class PaperAttentionFusion(FusionHead):
    def __init__(self, cfg: PaperAttentionConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        self.projections = projections(feature_dims, cfg.width)
        self.scorer = nn.Sequential(nn.Linear(cfg.width, cfg.scorer_hidden), nn.Tanh(), nn.Linear(cfg.scorer_hidden, 1))
        self.task_query = nn.Parameter(torch.zeros(cfg.width))
        if cfg.combine == "sum":
            self.classifier = nn.Linear(cfg.width, num_classes)
        else:  # one block of the concatenation's classifier per pretext
            self.classifiers = nn.ModuleList(nn.Linear(dim, num_classes) for dim in feature_dims)
        self._entropy = torch.zeros(())

    def project(self, features: list[torch.Tensor]) -> torch.Tensor:
        return project(self.projections, features)

    def scores(self, projected: torch.Tensor) -> torch.Tensor:
        if self.cfg.query == "task":
            return projected @ self.task_query / projected.shape[-1] ** 0.5
        return self.scorer(projected).squeeze(-1)

    def weights_of(self, projected: torch.Tensor) -> torch.Tensor:
        scores = self.scores(projected) / self.cfg.temperature
        return softmax_dropping_pretexts(scores, self.cfg.pretext_dropout if self.training else 0.0)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        features = [self.feature_dropout(f) for f in features]
        projected = self.project(features)
        weights = self.weights_of(projected)
        self._entropy = -(weights.clamp_min(1e-8).log() * weights).sum(1).mean()
        if self.cfg.combine == "sum":
            return self.classifier((weights.unsqueeze(-1) * projected).sum(dim=1))
        per_pretext = torch.stack([classify(f) for classify, f in zip(self.classifiers, features)], dim=1)
        return len(features) * (weights.unsqueeze(-1) * per_pretext).sum(dim=1)

    def pretext_weights(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.weights_of(self.project(features))

    def regularization(self) -> torch.Tensor:
        return self.cfg.entropy_weight * self._entropy
