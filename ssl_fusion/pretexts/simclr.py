"""SimCLR (Chen et al. 2020): two augmented views of an image attract, all other images repel (NT-Xent)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.data.augment import color_jitter, random_resized_crop
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig
from ssl_fusion.runtime.distributed import gather


@dataclass
class TwoViewConfig(PretextConfig):
    """The augmentation of the two-view methods (SimCLR, VICReg): random resized crop, colour jitter."""

    crop_scale_min: float = 0.3
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_p: float = 0.2


@dataclass
class SimCLRConfig(TwoViewConfig):
    temperature: float = 0.2
    projection_dim: int = 128
    projection_hidden: int = 256


def two_views(images: torch.Tensor, cfg: TwoViewConfig) -> torch.Tensor:
    """Two independently augmented views of a batch, stacked (first views, then second), channels_last."""

    def view() -> torch.Tensor:
        cropped = random_resized_crop(images, scale=(cfg.crop_scale_min, 1.0))
        return color_jitter(cropped, cfg.brightness, cfg.contrast, cfg.saturation, cfg.grayscale_p)

    return torch.cat([view(), view()]).contiguous(memory_format=torch.channels_last)


def similarity_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The (2N, 2N) cosine similarities of all views over the temperature, -inf on the diagonal, in float32.

    Autocast is off here: under bf16 autocast the matmul would round the logits (up to 1/temperature = 5) to steps
    of about 0.03, whatever ``.float()`` came before it."""
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        similarity = z @ z.t() / temperature
    return similarity.fill_diagonal_(float("-inf"))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross entropy: each view must pick its partner among the 2N-1 others.
    View i's partner is view i + N (mod 2N), labels made on the device: no host-to-device copy in a step."""
    n = z1.shape[0]
    partner = torch.arange(2 * n, device=z1.device).roll(n)
    return F.cross_entropy(similarity_logits(z1, z2, temperature), partner)


@PRETEXTS.register("simclr", SimCLRConfig)
class SimCLR(Pretext):
    """Under torchrun the loss contrasts the global batch (embeddings gathered from every rank)."""

    sync_batchnorm = True

    def __init__(self, cfg: SimCLRConfig, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        self.projector = nn.Sequential(
            nn.Linear(encoder.out_dim, cfg.projection_hidden),
            nn.BatchNorm1d(cfg.projection_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.projection_hidden, cfg.projection_dim),
        )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.encoder(two_views(images, self.cfg))).chunk(2)
        return nt_xent(gather(z1), gather(z2), self.cfg.temperature)
