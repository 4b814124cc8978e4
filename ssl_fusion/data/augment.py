"""Batched, per-sample random augmentations on float image tensors in [0, 1] (any device).

torchvision's v2 transforms draw one set of parameters per call, so augmenting a batch with them
means one call per image; on a 2-core CPU that dominates a SimCLR epoch. These draw parameters per
sample and apply them to the whole batch at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl_fusion.runtime.device import device_constant

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in the gray of an image


def random_resized_crop(images: torch.Tensor, scale: tuple[float, float], flip: bool = True) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` (aspect ratio 3/4..4/3), resize back, maybe mirror."""
    batch = images.shape[0]
    device = images.device
    area = torch.empty(batch, device=device).uniform_(*scale)
    log_ratio = torch.empty(batch, device=device).uniform_(math.log(3 / 4), math.log(4 / 3))
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    center_x = (torch.rand(batch, device=device) * 2 - 1) * (1 - width)
    center_y = (torch.rand(batch, device=device) * 2 - 1) * (1 - height)
    mirror = (
        torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0) if flip else torch.ones(batch, device=device)
    )
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def shift_flip_params(
    batch: int, max_shift: float, device: torch.device | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per sample: mirror sign (half of them -1) and x, y shift in [-max_shift, max_shift] of the size; (batch, 3)."""
    mirror = torch.where(torch.rand(batch, device=device, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(batch, 2, device=device, generator=generator) * 2 - 1) * max_shift
    return torch.cat([mirror[:, None], shift], dim=1)


def shift_flip(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Mirror and shift each image by its row of ``shift_flip_params`` (zero fill)."""
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device)
    theta[:, 0, 0] = params[:, 0]
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = params[:, 1:] * 2  # affine_grid's coordinates span [-1, 1]: a shift of s of the size is 2s
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_shift_flip(images: torch.Tensor, max_shift: float) -> torch.Tensor:
    """Shift by up to ``max_shift`` of the size (zero fill) and mirror half of the batch."""
    return shift_flip(images, shift_flip_params(images.shape[0], max_shift, images.device))


def color_jitter(
    images: torch.Tensor, brightness: float, contrast: float, saturation: float, grayscale_p: float
) -> torch.Tensor:
    """Per-sample brightness, contrast and (RGB only) saturation factors, and random grayscale."""
    batch = images.shape[0]
    shape = (batch, 1, 1, 1)
    device = images.device
    out = images * torch.empty(shape, device=device).uniform_(1 - brightness, 1 + brightness)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * torch.empty(shape, device=device).uniform_(1 - contrast, 1 + contrast) + mean
    if images.shape[1] == 3:
        gray = (out * device_constant(LUMA, device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = gray + (out - gray) * torch.empty(shape, device=device).uniform_(1 - saturation, 1 + saturation)
        to_gray = torch.rand(shape, device=device) < grayscale_p
        out = torch.where(to_gray, gray.expand_as(out), out)
    return out.clamp(0, 1)
