"""Denoising autoencoder (Vincent et al. 2008): reconstruct the clean image from a corrupted one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List

import torch
import torch.nn.functional as F

from ssl_fusion.models.decoders import VectorDecoder
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig
from ssl_fusion.runtime.checks import Rule, one_of, within


@dataclass
class DenoisingConfig(PretextConfig):
    noise: str = "gaussian"
    level: float = 0.2
    decoder_widths: List[int] = field(default_factory=lambda: [128, 64, 32, 16])

    def rules(self) -> dict[str, Rule]:
        shares = " (the noise std for gaussian, the share of pixels hit otherwise)"
        return {**super().rules(), "noise": one_of(NOISES), "level": within(0, 1, "()", shares)}


def pixel_draw(images: torch.Tensor) -> torch.Tensor:
    """One uniform number per pixel position, shared by its channels (a pixel is hit as a whole)."""
    return torch.rand_like(images[:, :1])


def gaussian_noise(images: torch.Tensor, level: float) -> torch.Tensor:
    """Add N(0, level^2) to every value, then clamp to [0, 1]."""
    return (images + level * torch.randn_like(images)).clamp(0, 1)


def salt_pepper_noise(images: torch.Tensor, level: float) -> torch.Tensor:
    """Set a share ``level`` of the pixels to black or white (half each)."""
    hit = pixel_draw(images) < level
    white = (pixel_draw(images) < 0.5).to(images.dtype)
    return torch.where(hit, white, images)


def masking_noise(images: torch.Tensor, level: float) -> torch.Tensor:
    """Set a share ``level`` of the pixels to 0."""
    return images.masked_fill(pixel_draw(images) < level, 0.0)


NOISES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "gaussian": gaussian_noise,
    "salt_pepper": salt_pepper_noise,
    "masking": masking_noise,
}


def corrupt(images: torch.Tensor, noise: str, level: float) -> torch.Tensor:
    """The encoder's input; the reconstruction target is ``images`` itself."""
    return NOISES[noise](images, level)


@PRETEXTS.register("denoising", DenoisingConfig)
class Denoising(Pretext):
    def __init__(self, cfg: DenoisingConfig, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        self.decoder = VectorDecoder(encoder.out_dim, encoder.channels, cfg.decoder_widths)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        noisy = corrupt(images, self.cfg.noise, self.cfg.level).contiguous(memory_format=torch.channels_last)
        reconstruction = torch.sigmoid(self.decoder(self.encoder(noisy), images.shape[-2:]))
        return F.mse_loss(reconstruction, images)
