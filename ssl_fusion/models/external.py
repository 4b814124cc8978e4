"""Encoders made elsewhere, fed the dataset's images converted to what they take.

A user names one on the command line (``+external.<name>.arch=torchvision:resnet50
+external.<name>.checkpoint=<file>``) and lists ``<name>`` in ``pretexts=[...]``; the cache stage runs it
like a stored encoder. Its input is converted per batch: gray images repeated to three channels, resized
to ``image_size`` (when given), normalised by ``mean`` and ``std`` (ImageNet's by default, as
torchvision's and most timm models were trained).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.models.checkpoints import load_external_encoder
from ssl_fusion.runtime.errors import UserError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class ExternalEncoderConfig:
    arch: str = ""  # torchvision:<name> or timm:<name>
    checkpoint: Optional[str] = None  # None: random weights
    prefix: Optional[str] = None  # keys of the backbone in the checkpoint, when not recognised
    which: str = "teacher"  # DINO checkpoints: teacher or student
    image_size: Optional[int] = None  # pixels a side the encoder reads; None: the dataset's size
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))


KEYS = set(ExternalEncoderConfig.__dataclass_fields__)


def external_config(name: str, node: Any) -> ExternalEncoderConfig:
    """``+external.<name>.*`` as a typed config; a one-line UserError naming the key otherwise."""
    if not isinstance(node, dict) or not node.get("arch"):
        raise UserError(f"external.{name}: give external.{name}.arch (torchvision:<model> or timm:<model>)")
    unknown = sorted(set(node) - KEYS)
    if unknown:
        raise UserError(f"external.{name}.{unknown[0]}: not a key of an external encoder; keys: {', '.join(sorted(KEYS))}")
    cfg = ExternalEncoderConfig(**node)
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise UserError(f"external.{name}: mean and std need three values each, std > 0")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise UserError(f"external.{name}.image_size must be >= 8, got {cfg.image_size}")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise UserError(f"external.{name}.checkpoint: no file '{cfg.checkpoint}'")
    return cfg


def checkpoint_sha256(cfg: ExternalEncoderConfig) -> Optional[str]:
    """The content hash of the checkpoint file, which the features' key holds."""
    if cfg.checkpoint is None:
        return None
    digest = hashlib.sha256()
    with open(cfg.checkpoint, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ExternalEncoder(nn.Module):
    """The backbone behind the conversion of the dataset's images (floats in [0, 1]) to its input."""

    def __init__(self, backbone: nn.Module, out_dim: int, cfg: ExternalEncoderConfig) -> None:
        super().__init__()
        self.backbone, self.out_dim, self.image_size = backbone, out_dim, cfg.image_size
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1))

    def convert(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                                   align_corners=False)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.convert(images))


def build_external(cfg: ExternalEncoderConfig, channels: int) -> tuple[ExternalEncoder, str]:
    """The encoder with its checkpoint loaded (every backbone weight matched) and the recognised format."""
    if channels not in (1, 3):
        raise UserError(f"external encoders read 1- or 3-channel images; the dataset has {channels}")
    backbone, width, found = load_external_encoder(cfg.arch, cfg.checkpoint, cfg.prefix, cfg.which)
    return ExternalEncoder(backbone, width, cfg).eval(), found


def conversion(cfg: ExternalEncoderConfig, channels: int, image_size: tuple[int, int]) -> dict[str, Any]:
    """What the cache stage does to the dataset's images for this encoder, for the features' manifest."""
    size = cfg.image_size or image_size[0]
    return {"channels": f"{channels} -> 3" + (" (gray repeated)" if channels == 1 else ""),
            "size": f"{image_size[0]}x{image_size[1]} -> {size}x{size}", "mean": cfg.mean, "std": cfg.std}
