"""Any folder of class sub-folders: ``data_dir/{train,test}/<class>/*`` or ``data_dir/<class>/*`` (split here)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from sklearn.model_selection import train_test_split
from torchvision.datasets import ImageFolder

from ssl_fusion.data.datasets import (
    DATASETS,
    DEFAULT_DATA_ROOT,
    DatasetConfig,
    ImageData,
)
from ssl_fusion.runtime.errors import UserError

log = logging.getLogger("sslfuse")


@dataclass
class ImageFolderConfig(DatasetConfig):
    image_size: int = 32
    channels: int = 3
    test_fraction: float = 0.2
    split_seed: int = 0
    on_unreadable: str = "refuse"  # refuse: stop naming the file; skip: leave it out and report how many


def read_folder(folder: Path, cfg: ImageFolderConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    steps = [T.Resize((cfg.image_size, cfg.image_size), antialias=True)]
    if cfg.channels == 1:
        steps.append(T.Grayscale(1))
    transform = T.Compose([T.PILToTensor(), *steps])
    try:
        dataset = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(f"dataset image_folder: '{folder}' holds no class folders with images ({err})") from None
    if len(dataset.classes) < 2:
        raise UserError(f"dataset image_folder: '{folder}' has {len(dataset.classes)} class folder(s); at least 2 are needed")
    if cfg.on_unreadable not in ("refuse", "skip"):
        raise UserError(f"dataset.on_unreadable must be refuse or skip, got '{cfg.on_unreadable}'")
    images, targets, skipped = [], [], []
    for path, target in dataset.samples:
        try:
            images.append(transform(dataset.loader(path)))
            targets.append(target)
        except OSError as err:
            if cfg.on_unreadable == "refuse":
                raise UserError(f"dataset image_folder: cannot read image '{path}' ({err}); set dataset.on_unreadable=skip to leave such files out") from None
            skipped.append(path)
    if skipped:
        log.warning("dataset image_folder: skipped %d unreadable image(s) under '%s', e.g. '%s'", len(skipped), folder, skipped[0])
    return torch.stack(images), torch.tensor(targets), list(dataset.classes)


@DATASETS.register("image_folder", ImageFolderConfig)
def load_image_folder(cfg: ImageFolderConfig, root: Path) -> ImageData:
    if root == DEFAULT_DATA_ROOT:
        raise UserError("dataset image_folder needs data_dir=<folder of class sub-folders>")
    if cfg.channels not in (1, 3):
        raise UserError(f"dataset.channels must be 1 or 3, got {cfg.channels}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_images, train_labels, classes = read_folder(root / "train", cfg)
        test_images, test_labels, test_classes = read_folder(root / "test", cfg)
        if test_classes != classes:
            raise UserError(f"dataset image_folder: '{root}/train' and '{root}/test' have different class folders")
        return ImageData(train_images, train_labels, test_images, test_labels, classes)
    images, labels, classes = read_folder(root, cfg)
    if not 0 < cfg.test_fraction < 1:
        raise UserError(f"dataset.test_fraction must be in (0, 1), got {cfg.test_fraction}")
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=cfg.test_fraction, stratify=labels.numpy(), random_state=cfg.split_seed
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return ImageData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], classes)
