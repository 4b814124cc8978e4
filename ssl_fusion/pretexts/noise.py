"""``noise``: features that do not depend on the image at all (a fixed random vector per sample index).

The clean negative-transfer control: a fusion method that is hurt by adding it cannot ignore a
useless source. Nothing is trained; the cache stage draws the vectors from the encoder's seed.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig


@PRETEXTS.register("noise", PretextConfig)
class Noise(Pretext):
    trains = False
    ignores_images: ClassVar[bool] = True

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the noise pretext is never trained")
