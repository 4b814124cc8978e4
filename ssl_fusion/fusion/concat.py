"""Concatenate all pretexts' features and classify: linear (``hidden: 0``) or a one-hidden-layer MLP.

``concat``'s ``pretext_dropout`` is attention's pretext dropout without the attention: in training each pretext's
feature block of a sample is left out with that probability (never all of a sample's) and the blocks kept are scaled
by ``pretexts / kept``. A linear ``concat`` then has the logits of ``attention`` with ``scorer: uniform`` and the same
dropout, ``P · Σ_p w_p z_p + b`` with ``w`` uniform over the pretexts kept: the control that tells whether
attention's gain is its weights' or its dropout's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ssl_fusion.fusion import FUSIONS, FusionConfig, FusionHead, dropped_pretexts
from ssl_fusion.runtime.checks import Rule, within


@dataclass
class LinearConfig(FusionConfig):
    hidden: int = 0
    feature_dropout: float = 0.0  # a linear head: L2 and early stopping regularise it, as in logistic regression
    restarts: int = 1  # from zero and without dropout every refit is the same


@dataclass
class ConcatConfig(LinearConfig):
    pretext_dropout: float = 0.0  # in training, a pretext's block is left out of a sample with this probability

    def rules(self) -> dict[str, Rule]:
        return {**super().rules(), "pretext_dropout": within(0, 1, "[)")}


def classifier(in_dim: int, hidden: int, num_classes: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(in_dim, num_classes)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))


class LinearFusion(FusionHead):
    """A classifier on the concatenation of the features it reads: one linear map (``hidden: 0``) or an MLP."""

    def __init__(self, cfg: LinearConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__(cfg, feature_dims, num_classes)
        self.classifier = classifier(sum(feature_dims), cfg.hidden, num_classes)
        if not cfg.hidden:  # logistic regression's start: every class equally likely
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def joined(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The classifier's input: the features side by side (after feature dropout in training)."""
        return self.feature_dropout(torch.cat(features, dim=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.joined(features))

    def stacked_logits(self, params: dict[str, torch.Tensor], features: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """With one linear map, every member's logits as one matrix product over the members' stacked weights."""
        if self.cfg.hidden:
            return None
        weight, bias = (
            params["classifier.weight"],
            params["classifier.bias"],
        )  # (members, classes, dim), (members, classes)
        members, classes, dim = weight.shape
        inputs = self.joined(features)
        logits = inputs @ weight.reshape(members * classes, dim).T + bias.reshape(-1)
        return logits.view(len(inputs), members, classes).transpose(0, 1)


@FUSIONS.register("concat", ConcatConfig)
class ConcatFusion(LinearFusion):
    """All pretexts' features side by side."""

    def joined(self, features: list[torch.Tensor]) -> torch.Tensor:
        """In training with ``pretext_dropout``, each sample's blocks kept scaled by ``pretexts / kept`` and the others
        zero (one draw per sample, shared by the members of a stack)."""
        inputs = super().joined(features)
        if not (self.training and self.cfg.pretext_dropout > 0):
            return inputs
        kept = (~dropped_pretexts(inputs.new_empty(len(inputs), len(features)), self.cfg.pretext_dropout)).float()
        scale = kept * len(features) / kept.sum(1, keepdim=True)
        widths = torch.tensor([f.shape[1] for f in features], device=inputs.device)
        return inputs * scale.repeat_interleave(widths, dim=1)
