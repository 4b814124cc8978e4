"""Decoders for reconstruction pretexts: the encoder's global feature vector -> an image-shaped map.

The encoders return only a pooled vector, so reconstruction pretexts (inpainting, denoising,
colorization) rebuild a spatial map from it: a linear layer to a 4x4 grid, 2x transposed-conv
upsamplings, a 3x3 output conv, and a bilinear resize to the exact target size, so one decoder
serves 8, 16, 28 and 32 px images alike.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

START_SIZE = 4


def upsample_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Double the resolution; kernel 4 with stride 2 covers every output pixel evenly (no checkerboard)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class VectorDecoder(nn.Module):
    """(B, in_dim) -> (B, out_channels, H, W) float32, unbounded (apply sigmoid/tanh in the pretext).

    ``widths`` are the channels at 4x4, 8x8, 16x16, ...: ``len(widths) - 1`` upsamplings.
    """

    deterministic_on_cuda: ClassVar[bool] = False  # the bilinear resize's CUDA backward adds atomically

    def __init__(self, in_dim: int, out_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        widths = list(widths)
        self.start_channels = widths[0]
        self.project = nn.Sequential(nn.Linear(in_dim, widths[0] * START_SIZE * START_SIZE), nn.ReLU(inplace=True))
        blocks = [upsample_block(c_in, c_out) for c_in, c_out in zip(widths, widths[1:])]
        self.blocks = nn.Sequential(*blocks, nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        grid = self.project(features).view(-1, self.start_channels, START_SIZE, START_SIZE)
        out = self.blocks(grid.contiguous(memory_format=torch.channels_last))
        return F.interpolate(out.float(), size=tuple(size), mode="bilinear", align_corners=False)
