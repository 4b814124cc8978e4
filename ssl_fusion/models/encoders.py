"""Encoders: image (float in [0, 1]) -> feature vector. Each normalises its input with stored statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, List, Optional

import torch
import torchvision
from omegaconf import MISSING
from torch import nn

from ssl_fusion.data.batches import Images, decoded
from ssl_fusion.data.datasets import sample_indices
from ssl_fusion.runtime.checks import Checked
from ssl_fusion.runtime.registry import Registry

STATISTICS_SAMPLE = 10000  # images whose pixels give the input statistics


@dataclass
class EncoderConfig(Checked):
    section: ClassVar[str] = "encoder"
    name: str = MISSING


@dataclass
class SmallCNNConfig(EncoderConfig):
    widths: List[int] = field(default_factory=lambda: [32, 64, 128, 256])


class Encoder(nn.Module):
    """A backbone with the per-channel mean/std of its pretraining data kept as buffers.

    Keeping the statistics in the state dict means every later stage feeds the encoder exactly
    as pretraining did, without reading the pretraining config.
    """

    def __init__(self, backbone: nn.Module, out_dim: int, channels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_dim = out_dim
        self.channels = channels  # of the input images
        self.register_buffer("mean", torch.full((1, channels, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, channels, 1, 1), 0.25))

    def set_statistics(
        self,
        images_uint8: Images,
        encoder_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        sample_size: int = STATISTICS_SAMPLE,
        seed: int = 0,
    ) -> None:
        """Per-channel mean and std over a seeded random sample of ``sample_size`` images (all of them when fewer),
        drawn from the whole split so that every class counts even where the images are stored sorted by class.
        ``encoder_input``, if given, turns batches of images (floats in [0, 1]) into what the encoder is fed (a
        pretext's ``encoder_input``, e.g. lightness): the statistics are those of that input."""
        batches = []
        for chunk in sample_indices(len(images_uint8), sample_size, seed).split(1024):
            batch = decoded(images_uint8[chunk]).float() / 255.0
            batches.append(batch if encoder_input is None else encoder_input(batch))
        sample = torch.cat(batches)
        self.mean.copy_(sample.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(sample.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)


Builder = Callable[[EncoderConfig, int], Encoder]
ENCODERS: Registry[Builder] = Registry("encoder")


def conv_block(in_ch: int, out_ch: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


@ENCODERS.register("small_cnn", SmallCNNConfig)
def small_cnn(cfg: SmallCNNConfig, channels: int) -> Encoder:
    """Conv blocks with 2x ceil-mode pooling after all but the last, then global average pooling: runs on any image
    size (a map that reaches 1x1 stays 1x1)."""
    widths = list(cfg.widths)
    blocks = [
        conv_block(c_in, c_out, pool=i < len(widths) - 1)
        for i, (c_in, c_out) in enumerate(zip([channels, *widths], widths))
    ]
    backbone = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Encoder(backbone, widths[-1], channels)


@ENCODERS.register("resnet18", EncoderConfig)
def resnet18_cifar(cfg: EncoderConfig, channels: int) -> Encoder:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 conv, no max-pool): 512-d, meant for GPUs."""
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return Encoder(net, 512, channels)


def build_encoder(cfg: EncoderConfig, channels: int) -> Encoder:
    return ENCODERS.get(cfg.name).impl(cfg, channels)
