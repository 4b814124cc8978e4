"""Shared check for pretext tests: does a short pretraining on real images beat the untrained encoder?"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ssl_fusion.datasets import ImageData, load_dataset
from ssl_fusion.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import PRETEXTS, PretextConfig
from ssl_fusion.probe import extract_features, knn_accuracy
from ssl_fusion.trainer import train_pretext


def fashion_mnist_subset(n_train: int = 4000, n_test: int = 1000) -> ImageData:
    return load_dataset({"name": "fashion_mnist", "max_train": n_train, "max_test": n_test}, None)[1]


def knn_of(encoder, data: ImageData) -> float:
    device, dtype = torch.device("cpu"), torch.bfloat16
    bank = extract_features(encoder, data.train_images, 1024, device, dtype)
    queries = extract_features(encoder, data.test_images, 1024, device, dtype)
    return knn_accuracy(bank, data.train_labels, queries, data.test_labels, k=20, num_classes=data.num_classes)


def short_pretraining_knn(recipe: PretextConfig, data: ImageData, checkpoint_dir: Path, seed: int = 0) -> tuple[float, float, list[float]]:
    """kNN accuracy after pretraining with ``recipe`` on ``data``, of the same encoder before it, and the epoch losses."""
    torch.manual_seed(seed)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn"), data.channels)
    encoder.set_statistics(data.train_images)
    untrained = copy.deepcopy(encoder)
    pretext_cls = PRETEXTS.get(recipe.name).impl
    recipe = pretext_cls.adapt(recipe, data)
    model = pretext_cls(recipe, encoder).to(memory_format=torch.channels_last)
    result = train_pretext(
        model, data.train_images, data.train_labels, recipe, torch.device("cpu"), torch.bfloat16, seed, checkpoint_dir / "ckpt.pt"
    )
    return knn_of(encoder, data), knn_of(untrained, data), result.epoch_losses
