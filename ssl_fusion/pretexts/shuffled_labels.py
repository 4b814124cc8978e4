"""``shuffled_labels``: the ``supervised`` recipe on the pretraining images with their labels permuted once, by a
generator seeded with ``label_seed``. The encoder is trained on real images, but on labels that carry nothing about
them: a control for negative transfer, which a fusion head should learn to ignore.

The trainer gives ``loss`` a batch's images and their true labels, not the batch's indices; so ``adapt`` keys every
pretraining image by its pixels (``image_keys``) and ``loss`` finds each image's permuted label by its key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ssl_fusion.data.batches import Images, uint8_batches
from ssl_fusion.data.datasets import ImageData
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.pretexts.supervised import Supervised, SupervisedConfig

KEY_PRIME = 2**31 - 1  # each of an image's two weighted pixel sums is taken modulo this prime
KEY_WEIGHTS_SEED = 0  # the weights of the sums: the same keys for every run
KEY_BATCH = 1024  # images keyed at a time by ``adapt``


@dataclass
class ShuffledLabelsConfig(SupervisedConfig):
    label_seed: int = 0  # seeds the permutation of the labels; the same seed gives the same permutation


@dataclass(frozen=True)
class ImageLabels:
    """The permuted label of each pretraining image, under its key: ``keys`` sorted, ``labels`` in their order."""

    weights: torch.Tensor  # (2, values per image) int64, for ``image_keys``
    keys: torch.Tensor
    labels: torch.Tensor


@dataclass
class KeyedShuffledLabelsConfig(ShuffledLabelsConfig):
    """What ``adapt`` gives: the recipe and the pretraining images' permuted labels, under their keys. Made from the
    data, never from a config file."""

    images: Optional[ImageLabels] = None


def shuffled_labels(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """``labels`` permuted by a generator seeded with ``seed``: the same counts per class, given to other images."""
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def key_weights(values: int) -> torch.Tensor:
    """Two rows of seeded random weights in [0, KEY_PRIME), one per value of an image."""
    return torch.randint(0, KEY_PRIME, (2, values), generator=torch.Generator().manual_seed(KEY_WEIGHTS_SEED))


def image_keys(pixels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A 62-bit key of each uint8 image: two random weighted sums of its values, each modulo ``KEY_PRIME``. Integer
    arithmetic, so every device gives the same keys (each sum stays below 2^63 up to 2^24 values per image); two
    different images share a key with probability about 2^-62, identical images always do."""
    sums = (pixels.flatten(1).long().unsqueeze(1) * weights).sum(2) % KEY_PRIME
    return sums[:, 0] * KEY_PRIME + sums[:, 1]


def keyed_labels(images: Images, labels: torch.Tensor, seed: int) -> ImageLabels:
    """Every image's key with its permuted label (``shuffled_labels``); identical images share the label of the
    first of them."""
    weights = key_weights(int(torch.tensor(images.shape[1:]).prod()))
    keys = torch.cat([image_keys(batch, weights) for batch in uint8_batches(images, KEY_BATCH, False, 0)])
    keys, order = keys.sort(stable=True)
    return ImageLabels(weights, keys, shuffled_labels(labels, seed)[order])


@PRETEXTS.register("shuffled_labels", ShuffledLabelsConfig)
class ShuffledLabels(Supervised):
    # The permuted labels tell only how many images each class has, not which images are in it: the encoder is no
    # reference trained on the labels.
    uses_labels = False

    def __init__(self, cfg: KeyedShuffledLabelsConfig, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        if cfg.images is None:
            raise ValueError(
                "shuffled_labels needs the keyed labels of its images: build it from the config adapt gives"
            )
        self.register_buffer("key_weights", cfg.images.weights, persistent=False)
        self.register_buffer("keys", cfg.images.keys, persistent=False)
        self.register_buffer("permuted", cfg.images.labels, persistent=False)

    @classmethod
    def adapt(cls, cfg: ShuffledLabelsConfig, data: ImageData) -> KeyedShuffledLabelsConfig:
        recipe = super().adapt(cfg, data)
        fields = {field.name: getattr(recipe, field.name) for field in dataclasses.fields(ShuffledLabelsConfig)}
        images = keyed_labels(data.train_images, data.train_labels, cfg.label_seed)
        return KeyedShuffledLabelsConfig(**fields, images=images)

    def labels_of(self, images: torch.Tensor) -> torch.Tensor:
        """The permuted labels of a batch of pretraining images (floats in [0, 1], as the trainer gives them)."""
        keys = image_keys(images.mul(255).round().to(torch.uint8), self.key_weights)
        found = torch.searchsorted(self.keys, keys).clamp_max(len(self.keys) - 1)
        if not torch.equal(self.keys[found], keys):
            raise ValueError("shuffled_labels was given an image that is not among its pretraining images")
        return self.permuted[found]

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().loss(images, self.labels_of(images))
