"""Inpainting / masked-patch reconstruction (Pathak et al. 2016, context encoders; He et al. 2022, MAE):
hide random square patches of each image and reconstruct the image from the encoder's vector."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F

from ssl_fusion.data.datasets import ImageData
from ssl_fusion.models.decoders import VectorDecoder
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig
from ssl_fusion.runtime.checks import Rule, one_of
from ssl_fusion.runtime.errors import UserError

FILLS = ("zero", "mean")
LOSS_ON = ("masked", "all")


@dataclass
class InpaintingConfig(PretextConfig):
    patch_size: int = 4
    mask_ratio: float = 0.5
    fill: str = "mean"
    loss_on: str = "masked"
    decoder_widths: List[int] = field(default_factory=lambda: [128, 64, 32, 16])

    def rules(self) -> dict[str, Rule]:
        """``patch_size`` and ``mask_ratio`` depend on the image size: checked with the data (``check``)."""
        return {**super().rules(), "fill": one_of(FILLS), "loss_on": one_of(LOSS_ON)}


def masked_patch_count(size: tuple[int, int], patch_size: int, mask_ratio: float) -> tuple[int, int]:
    """(patches masked per image, patches per image)."""
    patches = (size[0] // patch_size) * (size[1] // patch_size)
    return round(mask_ratio * patches), patches


def patch_mask(
    batch: int, size: tuple[int, int], patch_size: int, mask_ratio: float, device: torch.device
) -> torch.Tensor:
    """(B, 1, H, W) bool, True on round(mask_ratio * patches) randomly chosen patches of each image."""
    grid = (size[0] // patch_size, size[1] // patch_size)
    masked, patches = masked_patch_count(size, patch_size, mask_ratio)
    chosen = torch.rand(batch, patches, device=device).argsort(dim=1)[:, :masked]
    mask = torch.zeros(batch, patches, dtype=torch.bool, device=device).scatter_(1, chosen, True)
    return mask.view(batch, 1, *grid).repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def mask_patches(
    images: torch.Tensor, patch_size: int, mask_ratio: float, fill: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's input (masked patches set to 0 or to the image's per-channel mean) and the mask.

    The reconstruction target is ``images`` itself.
    """
    mask = patch_mask(images.shape[0], images.shape[-2:], patch_size, mask_ratio, images.device)
    fill_value = images.mean(dim=(2, 3), keepdim=True) if fill == "mean" else images.new_zeros(())
    return torch.where(mask, fill_value, images), mask


def reconstruction_loss(
    reconstruction: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, loss_on: str
) -> torch.Tensor:
    """MSE against the original images, on the masked pixels only or on all of them. The masked mean is a sum over
    the mask's values by their count, both on the device: selecting the masked values instead would make the host
    wait to learn how many there are."""
    if loss_on == "all":
        return F.mse_loss(reconstruction, images)
    mask = mask.expand_as(images)
    squared = F.mse_loss(reconstruction, images, reduction="none")
    return torch.where(mask, squared, 0.0).sum() / mask.sum()


@PRETEXTS.register("inpainting", InpaintingConfig)
class Inpainting(Pretext):
    def __init__(self, cfg: InpaintingConfig, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        self.decoder = VectorDecoder(encoder.out_dim, encoder.channels, cfg.decoder_widths)

    @classmethod
    def check(cls, cfg: InpaintingConfig, data: ImageData) -> None:
        height, width = data.image_size
        if cfg.patch_size < 1 or height % cfg.patch_size or width % cfg.patch_size:
            divisors = [d for d in range(1, min(height, width) + 1) if height % d == 0 and width % d == 0]
            raise UserError(
                f"pretext.patch_size: {cfg.patch_size} does not divide the {height}x{width} images; "
                f"allowed: {', '.join(map(str, divisors))}"
            )
        masked, patches = masked_patch_count((height, width), cfg.patch_size, cfg.mask_ratio)
        if not 0 < cfg.mask_ratio < 1 or not 0 < masked < patches:
            raise UserError(
                f"pretext.mask_ratio: {cfg.mask_ratio} must be in (0, 1) and mask at least one but not all of the "
                f"{patches} patches (it masks {masked})"
            )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        masked, mask = mask_patches(images, cfg.patch_size, cfg.mask_ratio, cfg.fill)
        features = self.encoder(masked.contiguous(memory_format=torch.channels_last))
        reconstruction = torch.sigmoid(self.decoder(features, images.shape[-2:]))
        return reconstruction_loss(reconstruction, images, mask, cfg.loss_on)
