"""The torchvision datasets: read from ``data_dir``, which is never written to, else from ``outputs/data``, where they
are downloaded when allowed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.datasets as tvd

from ssl_fusion.data.datasets import (
    DATASETS,
    DEFAULT_DATA_ROOT,
    DatasetConfig,
    ImageData,
    data_lock,
    to_nchw_uint8,
)
from ssl_fusion.runtime.errors import UserError


@dataclass
class TorchvisionConfig(DatasetConfig):
    download: bool = True


def _labels(dataset) -> torch.Tensor:
    """torchvision names them ``targets`` in most datasets and ``labels`` in SVHN and STL-10."""
    targets = getattr(dataset, "targets", None)
    return torch.as_tensor(dataset.labels if targets is None else targets)


def owned(root: Path) -> bool:
    """Whether ``root`` is sslfuse's own data folder (``outputs/data`` or below it), the only place it writes data to;
    a user's ``data_dir`` is only read."""
    return root == DEFAULT_DATA_ROOT or DEFAULT_DATA_ROOT in root.parents


def fetch(factory, root: Path, train: bool, download: bool):
    """One split from ``root``. In sslfuse's own folder it is read under a shared ``data_lock``; when it is absent
    and ``download``, it is downloaded under the exclusive lock (torchvision skips the download when the files are
    there), so of the processes that start at once one downloads and the others wait, then read its files."""
    if not owned(root):
        return factory(root, train, False)
    with data_lock(root, exclusive=False):
        try:
            return factory(root, train, False)
        except RuntimeError:  # torchvision's word for files absent or corrupted
            if not download:
                raise
    with data_lock(root, exclusive=True):
        return factory(root, train, True)


def _open(name: str, factory, root: Path, train: bool, download: bool):
    try:
        return fetch(factory, root, train, download)
    except RuntimeError as err:
        if not owned(root):
            raise UserError(
                f"dataset {name}: not found under data_dir '{root}', which sslfuse only reads: put the "
                "files there, or leave data_dir unset to read or download them in outputs/data"
            ) from None
        hint = "set dataset.download=true" if not download else "check the network or the folder"
        raise UserError(
            f"dataset {name}: cannot read it under '{root}' ({err}); pass data_dir=<folder> or {hint}"
        ) from None
    except OSError as err:
        raise UserError(
            f"dataset {name}: download to '{root}' failed ({err}); pass data_dir=<folder holding it>"
        ) from None


def load_torchvision(name: str, factory, cfg: TorchvisionConfig, root: Path) -> ImageData:
    """The dataset read from ``root``; downloaded there only when allowed and ``root`` is sslfuse's own folder."""
    download = cfg.download and owned(root)
    train = _open(name, factory, root, True, download)
    test = _open(name, factory, root, False, download)
    classes = list(getattr(train, "classes", [])) or [str(c) for c in sorted(set(_labels(train).tolist()))]
    return ImageData(to_nchw_uint8(train.data), _labels(train), to_nchw_uint8(test.data), _labels(test), classes)


FACTORIES = {
    "mnist": lambda root, train, dl: tvd.MNIST(root, train=train, download=dl),
    "cifar10": lambda root, train, dl: tvd.CIFAR10(root, train=train, download=dl),
    "cifar100": lambda root, train, dl: tvd.CIFAR100(root, train=train, download=dl),
    "svhn": lambda root, train, dl: tvd.SVHN(root, split="train" if train else "test", download=dl),
    "stl10": lambda root, train, dl: tvd.STL10(root, split="train" if train else "test", download=dl),
}

for _name, _factory in FACTORIES.items():
    DATASETS.register(_name, TorchvisionConfig)(
        lambda cfg, root, _name=_name, _factory=_factory: load_torchvision(_name, _factory, cfg, root)
    )
