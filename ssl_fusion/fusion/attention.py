"""Per-sample attention over pretexts that starts as ``concat`` and learns where to depart from it.

Each pretext p has its own linear classifier, so ``concat``'s logits are the sum of the pretexts' logits
``z_p(x)``. This head weights them per sample: ``logits(x) = P · Σ_p w_p(x) z_p(x) + b``, with
``w(x) = softmax(s(x) / temperature)`` over the P pretexts. The scorer ``s`` reads all pretexts' features of the
sample (concatenated), so whether a pretext is to be trusted for a sample can depend on what the others see.

Both the classifiers and the scorer's last layer start at zero: equal weights, every class equally likely, which
is exactly ``concat``'s (logistic regression's) start; the attention only departs from ``concat`` where the labels
pay for it, under the L2 strength and length the k-fold protocol chooses. With ``scorer_hidden: 0`` the scorer is
linear; its parameters (P per feature) stay below the classifiers' (one per class and feature), so the head has
about ``(1 + P / classes)`` times ``concat``'s parameters.

``scorer: uniform`` is the ablation "attention without attention": no scorer, the weights are uniform over the
pretexts kept (``1 / kept``, pretext dropout still applied in training), which is ``concat`` with the same
``pretext_dropout``. Where it matches the learned scorer, attention's gain is the dropout's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead, dropped_pretexts
from ssl_fusion.runtime.checks import Rule, above, at_least, one_of, within


@dataclass
class AttentionConfig(FusionConfig):
    scorer_hidden: int = 0  # 0: a linear scorer; else one tanh hidden layer of this width
    temperature: float = 1.0
    pretext_dropout: float = 0.5  # in training, each pretext's weight is set to 0 for a sample with this probability
    feature_dropout: float = 0.0
    restarts: int = 1  # from zero and without dropout every refit is the same
    scores_from: str = "features"  # features: all pretexts' features; logits: all pretexts' class logits
    scorer: str = "learned"  # learned: weights from the scorer; uniform: none trained, equal weights over the kept

    def rules(self) -> dict[str, Rule]:
        return {
            **super().rules(),
            "scorer_hidden": at_least(0),
            "temperature": above(0),
            "pretext_dropout": within(0, 1, "[)"),
            "scores_from": one_of(("features", "logits")),
            "scorer": one_of(("learned", "uniform")),
        }


def softmax_dropping_pretexts(scores: torch.Tensor, dropout: float) -> torch.Tensor:
    """Softmax over pretexts (dim 1) after leaving out each pretext of each sample with probability ``dropout``
    (never all of a sample's): the weights of the pretexts kept renormalise."""
    if dropout > 0:
        scores = scores.masked_fill(dropped_pretexts(scores, dropout), float("-inf"))
    return scores.softmax(dim=1)


def scorer(in_dim: int, hidden: int, pretexts: int) -> nn.Module:
    """All pretexts' features of a sample -> one score per pretext; the last layer starts at zero (equal weights)."""
    layers = (
        [nn.Linear(in_dim, pretexts)]
        if hidden == 0
        else [nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, pretexts)]
    )
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


@FUSIONS.register("attention", AttentionConfig)
class AttentionFusion(FusionHead):
    def __init__(self, cfg: AttentionConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        self.classifiers = nn.ModuleList(nn.Linear(dim, num_classes, bias=False) for dim in feature_dims)
        for classify in self.classifiers:
            nn.init.zeros_(classify.weight)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        if cfg.scorer == "learned":
            reads = sum(feature_dims) if cfg.scores_from == "features" else num_classes * len(feature_dims)
            self.scorer = scorer(reads, cfg.scorer_hidden, len(feature_dims))
            self.input_scale = reads**-0.5

    def scores_of(self, features: list[torch.Tensor], per_pretext: torch.Tensor) -> torch.Tensor:
        """(batch, pretexts) scores: the scorer's, or with ``scorer: uniform`` zeros (equal weights)."""
        if self.cfg.scorer == "uniform":
            return per_pretext.new_zeros(per_pretext.shape[:2])
        reads = torch.cat(features, dim=1) if self.cfg.scores_from == "features" else per_pretext.flatten(1)
        return self.scorer(reads * self.input_scale) / self.cfg.temperature

    def weights_of(self, features: list[torch.Tensor], per_pretext: torch.Tensor) -> torch.Tensor:
        """(batch, pretexts) weights summing to one per sample."""
        scores = self.scores_of(features, per_pretext)
        return softmax_dropping_pretexts(scores, self.cfg.pretext_dropout if self.training else 0.0)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        features = [self.feature_dropout(f) for f in features]
        per_pretext = torch.stack([classify(f) for classify, f in zip(self.classifiers, features)], dim=1)
        weights = self.weights_of(features, per_pretext)
        return len(features) * (weights.unsqueeze(-1) * per_pretext).sum(dim=1) + self.bias

    def pretext_weights(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.weights_of(
            features, torch.stack([classify(f) for classify, f in zip(self.classifiers, features)], dim=1)
        )
