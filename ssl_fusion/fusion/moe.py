"""Noisy top-k gating over pretexts (Shazeer et al., ICLR 2017; used over pretrained hubs by Hub-Pathway).

Gate logits come from all pretexts' features concatenated; while training, Gaussian noise scaled by a
learned softplus is added to them. Only the ``top_k`` largest logits are kept (the rest set to -inf)
before the softmax, so each sample reads exactly ``top_k`` pretexts. A load-balancing penalty, the
squared coefficient of variation of each pretext's mean gate over the batch, keeps the router from
collapsing onto one pretext early.

With ``top_k: 1`` the kept gate is always exactly 1, so the router gets no gradient from the task
loss (nor from the balance term): it stays as initialised and only its noise picks pretexts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead
from ssl_fusion.fusion.mean import project, projections
from ssl_fusion.runtime.checks import Rule, at_least
from ssl_fusion.runtime.errors import UserError


@dataclass
class MoEConfig(FusionConfig):
    width: int = 256
    top_k: int = 2
    balance_weight: float = 0.01

    def rules(self) -> dict[str, Rule]:
        """``top_k`` at most the number of pretexts: checked by the head, which knows it."""
        return {**super().rules(), "top_k": at_least(1)}


@FUSIONS.register("moe", MoEConfig)
class MoEFusion(FusionHead):
    @classmethod
    def fit_to(cls, cfg: MoEConfig, n_pretexts: int) -> tuple[MoEConfig, dict[str, str]]:
        """``top_k`` capped at the number of pretexts the screen left."""
        if cfg.top_k <= n_pretexts:
            return cfg, {}
        note = f"capped from {cfg.top_k} to {n_pretexts}: the screen left {n_pretexts} pretext(s)"
        return dataclasses.replace(cfg, top_k=n_pretexts), {"top_k": note}

    def __init__(self, cfg: MoEConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        count = len(feature_dims)
        if not 1 <= cfg.top_k <= count:
            raise UserError(f"fusion.top_k must be in [1, {count}] (the number of pretexts), got {cfg.top_k}")
        self.projections = projections(feature_dims, cfg.width)
        # Zero-initialised as in Shazeer et al.: the router starts uniform, noise breaks the ties.
        self.gate = nn.Linear(sum(feature_dims), count)
        self.noise = nn.Linear(sum(feature_dims), count)
        for layer in (self.gate, self.noise):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.classifier = nn.Linear(cfg.width, num_classes)
        self._balance = torch.zeros(())

    def gates_of(self, features: list[torch.Tensor], noisy: bool) -> torch.Tensor:
        joined = torch.cat(features, dim=1)
        logits = self.gate(joined)
        if noisy:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(joined))
        top, index = logits.topk(self.cfg.top_k, dim=1)
        return torch.full_like(logits, float("-inf")).scatter(1, index, top).softmax(dim=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        features = [self.feature_dropout(f) for f in features]
        gates = self.gates_of(features, noisy=self.training)
        importance = gates.mean(dim=0)
        self._balance = importance.var(correction=0) / importance.mean().square()
        projected = project(self.projections, features)
        return self.classifier((gates.unsqueeze(-1) * projected).sum(dim=1))

    def pretext_weights(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.gates_of(features, noisy=False)

    def regularization(self) -> torch.Tensor:
        return self.cfg.balance_weight * self._balance
