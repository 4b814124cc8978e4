"""Colorization (Zhang et al. 2016; Larsson et al. 2016): predict an image's colour (Lab a, b) from its lightness L."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F

from ssl_fusion.data.datasets import ImageData
from ssl_fusion.models.decoders import VectorDecoder
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig
from ssl_fusion.runtime.device import device_constant
from ssl_fusion.runtime.errors import UserError


@dataclass
class ColorizationConfig(PretextConfig):
    decoder_widths: List[int] = field(default_factory=lambda: [128, 64, 32, 16])


# Linear sRGB -> CIE XYZ under the D65 white point (IEC 61966-2-1), its inverse, and that white point; as tuples, put
# on a device once (``device_constant``).
RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
XYZ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(RGB_TO_XYZ, dtype=torch.float64)).tolist()))
D65_WHITE = (0.95047, 1.0, 1.08883)
EPSILON = 6 / 29
AB_SCALE = 110.0  # a and b of sRGB colours lie within about [-110, 110]


def mix_channels(matrix: tuple, images: torch.Tensor) -> torch.Tensor:
    """Per-pixel 3x3 colour transform as broadcast multiply-add, which autocast leaves in float32 (unlike matmul)."""
    weights = device_constant(matrix, images.device, images.dtype).view(1, 3, 3, 1, 1)
    return (weights * images.unsqueeze(1)).sum(dim=2)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIE Lab (L in [0, 100]) under D65, float32."""
    rgb = rgb.float()
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))
    xyz = mix_channels(RGB_TO_XYZ, linear) / device_constant(D65_WHITE, rgb.device).view(1, 3, 1, 1)
    f = torch.where(xyz > EPSILON**3, xyz.clamp_min(EPSILON**3).pow(1 / 3), xyz / (3 * EPSILON**2) + 4 / 29)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rgb_to_lab``; colours outside the sRGB gamut are clamped to [0, 1]."""
    lab = lab.float()
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > EPSILON, f.pow(3), 3 * EPSILON**2 * (f - 4 / 29))
    linear = mix_channels(XYZ_TO_RGB, xyz * device_constant(D65_WHITE, lab.device).view(1, 3, 1, 1)).clamp(0, 1)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.pow(1 / 2.4) - 0.055)


def colorization_pairs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's input (L / 100 in all three channels) and the target (a, b) / AB_SCALE."""
    lab = rgb_to_lab(images)
    lightness = (lab[:, :1] / 100).expand(-1, 3, -1, -1)
    return lightness, lab[:, 1:] / AB_SCALE


@PRETEXTS.register("colorization", ColorizationConfig)
class Colorization(Pretext):
    encoder_input_kind = "lightness"

    def __init__(self, cfg: ColorizationConfig, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        self.decoder = VectorDecoder(encoder.out_dim, 2, cfg.decoder_widths)

    @staticmethod
    def encoder_input(images: torch.Tensor) -> torch.Tensor:
        """The lightness the encoder is trained on (L / 100 in all three channels), also for caching and probes."""
        return colorization_pairs(images)[0]

    @classmethod
    def check(cls, cfg: ColorizationConfig, data: ImageData) -> None:
        if data.channels != 3:
            raise UserError(
                f"pretext colorization needs RGB images (3 channels), but the dataset has {data.channels} channel(s); "
                "choose an RGB dataset or another pretext"
            )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lightness, ab = colorization_pairs(images)
        predicted = self.decoder(
            self.encoder(lightness.contiguous(memory_format=torch.channels_last)), images.shape[-2:]
        )
        return F.mse_loss(predicted, ab)
