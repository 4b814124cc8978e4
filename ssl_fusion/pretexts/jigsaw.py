"""Jigsaw puzzles (Noroozi & Favaro 2016): which of a fixed set of tile permutations shuffled an image?

Unlike the paper's nine-tower network, the encoder sees the whole shuffled image in one forward pass.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.data.augment import random_shift_flip
from ssl_fusion.data.datasets import ImageData
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig
from ssl_fusion.runtime.errors import UserError

MIN_CANDIDATES = 2000  # random candidate permutations the greedy selection draws from (at least 20 per chosen one)


@dataclass
class JigsawConfig(PretextConfig):
    grid: int = 4
    num_permutations: int = 64
    permutation_seed: int = 0
    max_shift: float = 0.2
    head_hidden: int = 256


def maximin_permutations(tiles: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct permutations of ``tiles`` positions, far apart in Hamming distance, as a (count, tiles)
    tensor.

    Greedy maximin: start from the identity (so label 0 is the unshuffled image), then repeatedly add the
    candidate whose distance to its nearest chosen permutation is largest. The candidates are every
    permutation when there are few, else random ones; ``seed`` draws them and orders ties, so the set is
    deterministic.
    """
    generator = torch.Generator().manual_seed(seed)
    budget = max(MIN_CANDIDATES, 20 * count)
    if math.factorial(tiles) <= budget:
        candidates = torch.tensor(list(itertools.permutations(range(tiles))))
    else:
        candidates = torch.rand(budget, tiles, generator=generator).argsort(dim=1).unique(dim=0)
    candidates = candidates[torch.randperm(len(candidates), generator=generator)]
    chosen = [torch.arange(tiles)]
    nearest = (candidates != chosen[0]).sum(dim=1)
    for _ in range(count - 1):
        best = candidates[int(nearest.argmax())]
        chosen.append(best)
        nearest = torch.minimum(nearest, (candidates != best).sum(dim=1))
    return torch.stack(chosen)


def shuffle_tiles(images: torch.Tensor, permutations: torch.Tensor, grid: int) -> torch.Tensor:
    """Cut each image into grid x grid tiles; tile i of output b (raster order) is tile ``permutations[b, i]`` of
    input b."""
    height, width = images.shape[2:]
    tile = (height // grid, width // grid)
    columns = F.unfold(images, kernel_size=tile, stride=tile)
    shuffled = columns.gather(2, permutations.unsqueeze(1).expand(-1, columns.shape[1], -1))
    return F.fold(shuffled, (height, width), kernel_size=tile, stride=tile)


def jigsaw_pseudo_labels(
    images: torch.Tensor, permutations: torch.Tensor, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image shuffled by one permutation of the set drawn at random, and that permutation's index."""
    labels = torch.randint(0, len(permutations), (images.shape[0],), device=images.device)
    return shuffle_tiles(images, permutations[labels], grid), labels


@PRETEXTS.register("jigsaw", JigsawConfig)
class Jigsaw(Pretext):
    def __init__(self, cfg: JigsawConfig, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        # Derived from the config, so kept out of the state dict.
        permutations = maximin_permutations(cfg.grid**2, cfg.num_permutations, cfg.permutation_seed)
        self.register_buffer("permutations", permutations, persistent=False)
        self.head = nn.Sequential(
            nn.Linear(encoder.out_dim, cfg.head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.head_hidden, cfg.num_permutations),
        )

    @classmethod
    def check(cls, cfg: JigsawConfig, data: ImageData) -> None:
        height, width = data.image_size
        if cfg.grid < 2 or height % cfg.grid or width % cfg.grid:
            allowed = [g for g in range(2, min(height, width) + 1) if height % g == 0 and width % g == 0]
            raise UserError(
                f"pretext.grid={cfg.grid} must divide the image size {height}x{width}; "
                f"allowed: {', '.join(map(str, allowed)) or 'none (no common divisor above 1)'}"
            )
        most = math.factorial(cfg.grid**2)
        if not 2 <= cfg.num_permutations <= most:
            raise UserError(
                f"pretext.num_permutations={cfg.num_permutations} must be between 2 and {most} "
                f"(the number of orders of {cfg.grid}x{cfg.grid} tiles for pretext.grid={cfg.grid})"
            )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        augmented = random_shift_flip(images, self.cfg.max_shift)
        shuffled, order = jigsaw_pseudo_labels(augmented, self.permutations, self.cfg.grid)
        shuffled = shuffled.contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(self.head(self.encoder(shuffled)).float(), order)
