"""Rotation prediction (Gidaris et al. 2018): which of 0/90/180/270 degrees was an image turned by?"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.data.augment import random_shift_flip
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig


@dataclass
class RotationConfig(PretextConfig):
    all_rotations: bool = True
    max_shift: float = 0.1
    head_hidden: int = 256


def all_rotations_of(images: torch.Tensor) -> torch.Tensor:
    """(4, B, C, H, W): the batch turned counter-clockwise by 0, 1, 2 and 3 quarter turns."""
    return torch.stack([images.rot90(turns, dims=(2, 3)) for turns in range(4)])


def rotate_batch(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by its number of quarter turns: every rotation is made and each image's
    own is picked by index, so no data-dependent mask makes the host wait for the device."""
    return all_rotations_of(images)[quarter_turns, torch.arange(len(images), device=images.device)]


def rotation_pseudo_labels(images: torch.Tensor, all_rotations: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated images and the quarter-turn labels: all four per image (the whole batch turned by 0, then by 1, 2
    and 3 quarter turns), or one sampled per image."""
    if all_rotations:
        labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
        return all_rotations_of(images).flatten(0, 1), labels
    labels = torch.randint(0, 4, (images.shape[0],), device=images.device)
    return rotate_batch(images, labels), labels


@PRETEXTS.register("rotation", RotationConfig)
class Rotation(Pretext):
    def __init__(self, cfg: RotationConfig, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        self.head = nn.Sequential(
            nn.Linear(encoder.out_dim, cfg.head_hidden), nn.ReLU(inplace=True), nn.Linear(cfg.head_hidden, 4)
        )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rotated, turns = rotation_pseudo_labels(random_shift_flip(images, self.cfg.max_shift), self.cfg.all_rotations)
        rotated = rotated.contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(self.head(self.encoder(rotated)).float(), turns)
