"""Datasets as in-memory uint8 tensors (N, C, H, W) with int64 labels, loaded by name."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional

import torch
from omegaconf import MISSING

from ssl_fusion.runtime.checks import Checked, Rule, above, optional
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.registry import Registry, import_submodules

DEFAULT_DATA_ROOT = Path("outputs/data")
LOCK_FILE = ".lock"  # in a folder sslfuse writes data to: held while it writes there (``data_lock``)


@dataclass
class DatasetConfig(Checked):
    """Fields every dataset accepts; datasets with more options subclass it."""

    section: ClassVar[str] = "dataset"
    name: str = MISSING
    data_dir: Optional[str] = None  # the folder this dataset is read from (only read); None: outputs/data
    max_train: Optional[int] = None
    max_test: Optional[int] = None

    def rules(self) -> dict[str, Rule]:
        return {"max_train": optional(above(0)), "max_test": optional(above(0))}


@dataclass
class ImageData:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.train_images, self.train_labels
        if name == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"unknown split {name!r}")

    @functools.cached_property
    def fingerprints(self) -> dict[str, str]:
        """Content hash of each split (images and labels): what artifact keys depend on. Hashed once per loaded
        dataset (jobs of a multirun share it), since hashing Fashion-MNIST's 55 MB takes a noticeable fraction of a
        second; the tensors are not to be changed in place."""
        return {split: _content_hash(*self.split(split)) for split in ("train", "test")}


def _content_hash(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


Loader = Callable[[DatasetConfig, Path], ImageData]
DATASETS: Registry[Loader] = Registry("dataset")


def data_root(data_dir: Optional[str], key: str = "data_dir") -> Path:
    """The folder a dataset is read from: ``data_dir`` (the user's, never written to), else ``outputs/data`` (sslfuse's
    own, where downloads and unpacked files go); a one-line UserError naming ``key`` when it is no folder."""
    if data_dir is None:
        return DEFAULT_DATA_ROOT
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"{key}: '{data_dir}' does not exist or is not a folder")
    return root


@contextlib.contextmanager
def data_lock(root: Path, exclusive: bool) -> Iterator[None]:
    """Hold ``root/.lock`` (an ``flock``): exclusively to download or unpack into ``root``, shared to read it. The
    processes that load a dataset at once (torchrun's ranks, which load it before their process group exists;
    parallel jobs) then read together, one of them writes while the others wait, and none reads a file being
    written. A folder where no lock file can be made is not written to either: read without a lock."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCK_FILE, "a")
    except OSError:
        yield
        return
    with handle:  # closing it releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def with_location(cfg: DatasetConfig, data_dir: Optional[str]) -> DatasetConfig:
    """``cfg`` with its ``data_dir``, else ``data_dir`` (the top-level key: the downstream dataset's default folder)."""
    return cfg if cfg.data_dir is not None or data_dir is None else dataclasses.replace(cfg, data_dir=data_dir)


def location_key(key: str, cfg: DatasetConfig, data_dir: Optional[str]) -> str:
    """The key a user set to give ``cfg``'s folder: ``<key>.data_dir``, or the top-level ``data_dir``."""
    return f"{key}.data_dir" if cfg.data_dir is not None or data_dir is None else "data_dir"


def to_nchw_uint8(images) -> torch.Tensor:
    """Accept torchvision's layouts (N,H,W) / (N,H,W,C) numpy or tensors and return (N,C,H,W) uint8."""
    tensor = torch.as_tensor(images)
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    elif tensor.shape[-1] in (1, 3) and tensor.shape[1] not in (1, 3):
        tensor = tensor.permute(0, 3, 1, 2)
    return tensor.to(torch.uint8).contiguous()


def sample_indices(length: int, limit: Optional[int], seed: int = 0) -> torch.Tensor:
    """Indices (ascending) of a seeded random sample of ``limit`` of ``length`` samples; all of them when ``limit`` is
    None or not below ``length``. Drawn over the whole range, so a split stored sorted by class (``image_folder``)
    gives every class its share, as a leading slice would not."""
    if limit is None or limit >= length:
        return torch.arange(length)
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def _subset(images: torch.Tensor, labels: torch.Tensor, limit: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset (seed 0) so ``max_train`` keeps the class balance of the split."""
    if limit is None or limit >= len(labels):
        return images, labels
    keep = sample_indices(len(labels), limit, seed=0)
    return images[keep], labels[keep]


def load_dataset(node, data_dir: Optional[str] = None, key: str = "dataset") -> tuple[DatasetConfig, ImageData]:
    """The dataset ``node`` names, read from its ``data_dir``, else from ``data_dir``, else from ``outputs/data``."""
    given = DATASETS.typed_config(node, key=key)
    cfg = with_location(given, data_dir)
    loader = DATASETS.get(cfg.name).impl
    data = loader(cfg, data_root(cfg.data_dir, location_key(key, given, data_dir)))
    train_images, train_labels = _subset(data.train_images, data.train_labels, cfg.max_train)
    test_images, test_labels = _subset(data.test_images, data.test_labels, cfg.max_test)
    return cfg, ImageData(train_images, train_labels.long(), test_images, test_labels.long(), data.classes)


import_submodules(sys.modules[__name__])
