"""scikit-learn's 8x8 handwritten digits (1,797 images), split 75/25 stratified with a fixed seed."""

from __future__ import annotations

from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ssl_fusion.data.datasets import DATASETS, DatasetConfig, ImageData


@DATASETS.register("digits", DatasetConfig)
def load_sklearn_digits(cfg: DatasetConfig, root: Path) -> ImageData:
    bunch = load_digits()
    images = torch.from_numpy(bunch.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.25, stratify=labels.numpy(), random_state=0
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    classes = [str(c) for c in range(10)]
    return ImageData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], classes)
