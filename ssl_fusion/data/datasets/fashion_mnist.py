"""Fashion-MNIST: from ``data_dir`` (its gzipped IDX files, unpacked under ``outputs/data``, or torchvision's layout;
only read), else Debian's ``dataset-fashion-mnist``, else torchvision's download into ``outputs/data``."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import torchvision.datasets as tvd
from torchvision.datasets.utils import extract_archive

from ssl_fusion.data.datasets import DATASETS, DEFAULT_DATA_ROOT, ImageData, data_lock
from ssl_fusion.data.datasets.torchvision_sets import (
    TorchvisionConfig,
    load_torchvision,
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def holds_gzipped_idx(folder: Path) -> bool:
    return all((folder / name).is_file() for name in IDX_FILES)


def unpack_idx(source: Path, root: Path) -> None:
    """Unpack the gzipped IDX files into torchvision's layout ``root/FashionMNIST/raw``: once, atomically, by one of
    the processes that start at once (the others wait on the lock, then find the files)."""
    raw = root / "FashionMNIST" / "raw"
    with data_lock(root, exclusive=True):
        if all((raw / name.removesuffix(".gz")).is_file() for name in IDX_FILES):
            return
        raw.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=raw.parent, prefix=".raw-"))
        for name in IDX_FILES:
            extract_archive(str(source / name), str(staging))
        if raw.exists():
            shutil.rmtree(raw)
        staging.rename(raw)


def unpacked_root(source: Path) -> Path:
    """Where the files of one source folder are unpacked (the source itself may be read-only)."""
    tag = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    return DEFAULT_DATA_ROOT / f"fashion_mnist_{tag}"


@DATASETS.register("fashion_mnist", TorchvisionConfig)
def load_fashion_mnist(cfg: TorchvisionConfig, root: Path) -> ImageData:
    source = root if holds_gzipped_idx(root) else None
    if source is None and root == DEFAULT_DATA_ROOT and holds_gzipped_idx(DEBIAN_DIR):
        source = DEBIAN_DIR
    if source is not None:
        root = unpacked_root(source)
        unpack_idx(source, root)
    factory = lambda r, train, dl: tvd.FashionMNIST(r, train=train, download=dl)  # noqa: E731
    return load_torchvision("fashion_mnist", factory, cfg, root)
