"""Generated class-dependent images for tests and the smoke preset: no files, fully seeded.

Each class has a smooth random prototype; a sample is its class prototype, shifted by a few pixels,
with random contrast and pixel noise. Orientation carries class information, so rotation
prediction and contrastive learning both have something to learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ssl_fusion.data.datasets import DATASETS, DatasetConfig, ImageData


@dataclass
class SyntheticConfig(DatasetConfig):
    num_classes: int = 4
    n_train: int = 512
    n_test: int = 256
    image_size: int = 16
    channels: int = 1
    noise: float = 0.15
    seed: int = 0


def class_prototypes(cfg: SyntheticConfig, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(cfg.num_classes, cfg.channels, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(cfg.image_size, cfg.image_size), mode="bicubic", align_corners=False)


def draw(
    prototypes: torch.Tensor, labels: torch.Tensor, cfg: SyntheticConfig, generator: torch.Generator
) -> torch.Tensor:
    images = prototypes[labels]
    shifts = torch.randint(-2, 3, (len(labels), 2), generator=generator)
    images = torch.stack([torch.roll(img, tuple(s.tolist()), dims=(1, 2)) for img, s in zip(images, shifts)])
    contrast = 0.7 + 0.6 * torch.rand(len(labels), 1, 1, 1, generator=generator)
    images = (images - 0.5) * contrast + 0.5 + cfg.noise * torch.randn(images.shape, generator=generator)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@DATASETS.register("synthetic", SyntheticConfig)
def make_synthetic(cfg: SyntheticConfig, root: Path) -> ImageData:
    generator = torch.Generator().manual_seed(cfg.seed)
    prototypes = class_prototypes(cfg, generator)
    train_labels = torch.arange(cfg.n_train) % cfg.num_classes
    test_labels = torch.arange(cfg.n_test) % cfg.num_classes
    train = draw(prototypes, train_labels, cfg, generator)
    test = draw(prototypes, test_labels, cfg, generator)
    return ImageData(train, train_labels, test, test_labels, [f"class{c}" for c in range(cfg.num_classes)])
