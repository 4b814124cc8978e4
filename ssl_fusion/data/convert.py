"""Downstream images converted to what an encoder was pretrained on: its channel count and its size.

Used when the pretraining data (``pretrain_dataset``) is not the downstream data. Gray becomes RGB by repeating
the channel, RGB becomes gray by luminance (ITU-R BT.601 weights); sizes are resized bilinearly with antialiasing.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ssl_fusion.runtime.errors import UserError

LUMINANCE = (0.299, 0.587, 0.114)


def check_conversion(channels: int, to_channels: int) -> None:
    """Refuse, in one line, a channel conversion that has no meaning."""
    if channels != to_channels and {channels, to_channels} != {1, 3}:
        raise UserError(f"cannot feed {channels}-channel images to an encoder pretrained on {to_channels} channels")


def converter(
    channels: int, size: tuple[int, int], to_channels: int, to_size: tuple[int, int]
) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A function from a batch (floats in [0, 1], (N, channels, *size)) to the encoder's input; None when nothing
    changes."""
    check_conversion(channels, to_channels)
    if channels == to_channels and tuple(size) == tuple(to_size):
        return None

    def convert(batch: torch.Tensor) -> torch.Tensor:
        if channels == 1 and to_channels == 3:
            batch = batch.expand(-1, 3, -1, -1)
        elif channels == 3 and to_channels == 1:
            batch = (batch * torch.tensor(LUMINANCE, device=batch.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if tuple(batch.shape[-2:]) != tuple(to_size):
            batch = F.interpolate(batch, size=tuple(to_size), mode="bilinear", antialias=True, align_corners=False)
        return batch

    return convert


def describe(channels: int, size: tuple[int, int], to_channels: int, to_size: tuple[int, int]) -> dict[str, Any]:
    """The conversion as the features' manifest records it."""
    how = {(1, 3): " (repeated)", (3, 1): " (luminance)"}.get((channels, to_channels), "")
    return {
        "channels": f"{channels} -> {to_channels}{how}",
        "size": f"{size[0]}x{size[1]} -> {to_size[0]}x{to_size[1]}",
    }
