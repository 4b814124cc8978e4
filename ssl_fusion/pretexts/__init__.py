"""Pretext tasks: each module holds one pretext's pseudo-label transform, head and loss."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import MISSING
from torch import nn

from ssl_fusion.data.datasets import ImageData
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.runtime.checks import Checked
from ssl_fusion.runtime.registry import Registry, import_submodules


@dataclass
class PretextConfig(Checked):
    """The training recipe every pretext has; pretexts add their own fields in a subclass."""

    section: ClassVar[str] = "pretext"
    name: str = MISSING
    epochs: int = 5
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5


class Pretext(nn.Module):
    """An encoder plus the head and loss of one pretext task.

    ``loss`` receives a batch of images as floats in [0, 1] (and the labels, which only a
    supervised reference may use) and returns the scalar loss to minimise.
    """

    trains: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False  # True only for reference points such as ``supervised``
    ignores_images: ClassVar[bool] = False  # True for ``noise``: its cached features are random vectors
    sync_batchnorm: ClassVar[bool] = False  # under torchrun, BatchNorm statistics over the global batch
    encoder_input_kind: ClassVar[str] = "images"  # what ``encoder_input`` gives; recorded in the encoder's manifest

    def __init__(self, cfg: PretextConfig, encoder: Encoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder

    @staticmethod
    def encoder_input(images: torch.Tensor) -> torch.Tensor:
        """What the encoder is fed, made from a batch of images (floats in [0, 1]): pretraining trains the encoder on
        it, and its input statistics, the probes and the cache stage feed it the same. Default: the images."""
        return images

    @classmethod
    def adapt(cls, cfg: PretextConfig, data: ImageData) -> PretextConfig:
        """Fill config values that come from the dataset (e.g. the number of classes). Default: none."""
        return cfg

    @classmethod
    def check(cls, cfg: PretextConfig, data: ImageData) -> None:
        """Refuse, with a UserError, a dataset this pretext cannot run on. Default: any. (The config's own
        value ranges are its ``rules()``, checked when it is built.)"""

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


PRETEXTS: Registry[type[Pretext]] = Registry("pretext")

import_submodules(sys.modules[__name__])
