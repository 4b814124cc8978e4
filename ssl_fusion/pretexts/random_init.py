"""``random``: an untrained, seeded encoder. The control that shows what pretraining added."""

from __future__ import annotations

import torch

from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig


@PRETEXTS.register("random", PretextConfig)
class RandomInit(Pretext):
    trains = False

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the random pretext is never trained")
