"""``supervised``: cross entropy on the training labels through a linear head. A reference upper bound, not a
pretext."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.data.augment import random_shift_flip
from ssl_fusion.data.datasets import ImageData
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig
from ssl_fusion.runtime.errors import UserError


@dataclass
class SupervisedConfig(PretextConfig):
    num_classes: Optional[int] = None  # null: the dataset's number of classes
    max_shift: float = 0.1


@PRETEXTS.register("supervised", SupervisedConfig)
class Supervised(Pretext):
    uses_labels = True

    def __init__(self, cfg: SupervisedConfig, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        self.head = nn.Linear(encoder.out_dim, cfg.num_classes)

    @classmethod
    def adapt(cls, cfg: SupervisedConfig, data: ImageData) -> SupervisedConfig:
        return cfg if cfg.num_classes is not None else dataclasses.replace(cfg, num_classes=data.num_classes)

    @classmethod
    def check(cls, cfg: SupervisedConfig, data: ImageData) -> None:
        if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
            raise UserError(
                f"pretext.num_classes is {cfg.num_classes} but the dataset has {data.num_classes} classes; "
                f"set pretext.num_classes={data.num_classes}"
            )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = random_shift_flip(images, self.cfg.max_shift).contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(self.head(self.encoder(shifted)).float(), labels)
