"""Any folder of class sub-folders: ``data_dir/{train,test}/<class>/*`` or ``data_dir/<class>/*`` (split here).

The folder is listed, not decoded: each split is a ``FolderImages`` that decodes and resizes an image when it is
read, so the cache stage streams it batch by batch and memory does not grow with the folder. Stages that train on
the images decode them all through ``FolderData.materialise``."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ssl_fusion.data.datasets import (
    DATASETS,
    DEFAULT_DATA_ROOT,
    DatasetConfig,
    ImageData,
    _subset,
)
from ssl_fusion.runtime import distributed
from ssl_fusion.runtime.checks import Rule, above, one_of, within
from ssl_fusion.runtime.errors import UserError

log = logging.getLogger("sslfuse")


@dataclass
class ImageFolderConfig(DatasetConfig):
    image_size: int = 32
    channels: int = 3
    test_fraction: float = 0.2
    split_seed: int = 0
    on_unreadable: str = "refuse"  # refuse: stop naming the file; skip: leave it out and report how many

    def rules(self) -> dict[str, Rule]:
        return {
            **super().rules(),
            "image_size": above(0, " (pixels a side)"),
            "channels": one_of((1, 3)),
            "test_fraction": within(0, 1, "()"),
            "on_unreadable": one_of(("refuse", "skip")),
        }


class FolderImages(Dataset):
    """The image files of one split, decoded and resized when read: item ``i`` is image ``i`` as uint8 (C, H, W).
    Like a tensor, a slice or a tensor of indices gives the sub-list (still on disk), and ``shape`` is (N, C, H, W)."""

    def __init__(self, root: Path, files: list[str], image_size: int, channels: int) -> None:
        self.root, self.files, self.image_size, self.channels = root, files, image_size, channels
        self.transform = T.Compose([T.PILToTensor(), T.Resize((image_size, image_size), antialias=True)])

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), self.channels, self.image_size, self.image_size))

    def __getitem__(self, index: Union[int, slice, torch.Tensor]) -> Union[torch.Tensor, FolderImages]:
        if isinstance(index, int):
            return self.decode(self.files[index])
        picked = (
            self.files[index] if isinstance(index, slice) else [self.files[i] for i in torch.as_tensor(index).tolist()]
        )
        return FolderImages(self.root, picked, self.image_size, self.channels)

    def decode(self, file: str) -> torch.Tensor:
        """One image as uint8 (C, H, W); a UserError naming the file when it cannot be read."""
        path = self.root / file
        try:
            return self.transform(load_image(path, "L" if self.channels == 1 else "RGB"))
        except UNREADABLE as err:
            raise unreadable(path, err) from None

    def identify(self) -> None:
        """Read each file's header, not its pixels: a file that is no image is refused before the split is drawn
        (one whose pixels are broken is refused when it is decoded)."""
        for file in self.files:
            path = self.root / file
            try:
                Image.open(path).close()
            except UNREADABLE as err:
                raise unreadable(path, err) from None

    def materialise(self) -> torch.Tensor:
        """Every image decoded into one uint8 tensor (N, C, H, W): for the stages that train on the images."""
        return torch.stack([self.decode(file) for file in self.files])

    @functools.cached_property
    def digest(self) -> bytes:
        """A hash of the decoded shape, the files' paths (relative to the dataset's folder) and their bytes, read one
        file at a time: the content of the split without decoding it."""
        digest = hashlib.sha256(str(tuple(self.shape)).encode())
        for file in self.files:
            content = (self.root / file).read_bytes()
            digest.update(f"{file}\0{len(content)}\0".encode())
            digest.update(content)
        return digest.digest()


class PixelRangeError(ValueError):
    """Pixels of a wide mode outside the range sslfuse scales from (``eight_bit``)."""


# what reading a file that is no usable image raises: broken or no image (OSError), one declaring more pixels than
# twice Image.MAX_IMAGE_PIXELS (a decompression bomb, not an OSError), pixels of unknown scale
UNREADABLE = (OSError, Image.DecompressionBombError, PixelRangeError)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(path: Path, mode: str) -> Image.Image:
    """The image at ``path`` in ``mode`` (``RGB``, or ``L``: gray by PIL's rounded ITU-R 601-2 luma), 8 bits a channel;
    16-bit and float grayscale pixels are scaled to 8 bits (``eight_bit``), where PIL alone clips them to 255 or
    truncates them to 0 and 1."""
    with Image.open(path) as image:
        if image.mode in SIXTEEN_BIT_MODES + ("I", "F"):
            return Image.fromarray(eight_bit(np.asarray(image), image.mode)).convert(mode)
        return image.convert(mode)


def eight_bit(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Grayscale pixels of a wide PIL mode as uint8, full range to full range: 16-bit integers (``I;16*``, and ``I``,
    PIL's 32-bit integers, read as 16-bit) from [0, 65535], floats (``F``) from [0, 1]. A PixelRangeError for pixels
    out of that range, whose scale is unknown."""
    low, high = (0.0, 1.0) if mode == "F" else (0, 65535)
    if not (np.isfinite(pixels).all() and pixels.min() >= low and pixels.max() <= high):
        raise PixelRangeError(
            f"mode {mode} pixels in [{pixels.min()}, {pixels.max()}]: sslfuse reads this mode's "
            f"pixels from [{low}, {high}]"
        )
    return np.round(pixels.astype(np.float64) * (255 / high)).astype(np.uint8)


def unreadable(path: Path, err: Exception) -> UserError:
    return UserError(
        f"dataset image_folder: cannot read image '{path}' ({err}); set dataset.on_unreadable=skip to leave such "
        "files out"
    )


@dataclass
class FolderData(ImageData):
    """An image folder's splits, left on disk (``FolderImages``); its fingerprints hash the files, not the pixels."""

    @functools.cached_property
    def fingerprints(self) -> dict[str, str]:
        """Read under torchrun by every rank at the same point (the artifact keys): rank 0 alone reads the files,
        and sends the result to the others."""
        return distributed.on_main(
            lambda: {split: folder_fingerprint(*self.split(split)) for split in ("train", "test")}
        )

    def decoded(self) -> ImageData:
        return ImageData(
            self.train_images.materialise(),
            self.train_labels,
            self.test_images.materialise(),
            self.test_labels,
            self.classes,
        )

    def materialise(self) -> ImageData:
        """The splits decoded into uint8 tensors, with this folder's fingerprints: artifact keys are the same whether
        a stage streams the folder or decodes it."""
        decoded = self.decoded()
        decoded.fingerprints = self.fingerprints  # shadows ImageData's hash of the pixels
        return decoded


def folder_fingerprint(images: FolderImages, labels: torch.Tensor) -> str:
    return hashlib.sha256(images.digest + labels.numpy().tobytes()).hexdigest()[:16]


def list_folder(folder: Path, root: Path, cfg: ImageFolderConfig) -> tuple[FolderImages, torch.Tensor, list[str]]:
    """The images of ``folder`` (paths relative to ``root``), their labels and the class names. With
    ``on_unreadable=skip`` every image is decoded once here, to leave out those that cannot be read; else each file's
    header is read, to refuse one that is no image."""
    try:
        dataset = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(f"dataset image_folder: '{folder}' holds no class folders with images ({err})") from None
    if len(dataset.classes) < 2:
        raise UserError(
            f"dataset image_folder: '{folder}' has {len(dataset.classes)} class folder(s); at least 2 are needed"
        )
    images = FolderImages(
        root, [Path(path).relative_to(root).as_posix() for path, _ in dataset.samples], cfg.image_size, cfg.channels
    )
    labels = torch.tensor([target for _, target in dataset.samples])
    if cfg.on_unreadable == "skip":
        keep = readable(images)
        if len(keep) < len(images):
            dropped = sorted(set(range(len(images))) - set(keep))
            log.warning(
                "dataset image_folder: skipped %d unreadable image(s) under '%s', e.g. '%s'",
                len(dropped),
                folder,
                root / images.files[dropped[0]],
            )
        kept = torch.tensor(keep, dtype=torch.long)
        images, labels = images[kept], labels[kept]
    else:
        images.identify()
    return images, labels, list(dataset.classes)


def readable(images: FolderImages) -> list[int]:
    """The indices of the images that decode (each is decoded once, and not kept)."""
    keep = []
    for index in range(len(images)):
        try:
            images[index]
        except UserError:
            continue
        keep.append(index)
    return keep


def open_image_folder(cfg: ImageFolderConfig, root: Path) -> FolderData:
    """The folder's splits, listed and not decoded (``max_train``/``max_test`` not applied)."""
    if root == DEFAULT_DATA_ROOT:
        raise UserError("dataset image_folder needs dataset.data_dir=<folder of class sub-folders> (or data_dir=...)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_images, train_labels, classes = list_folder(root / "train", root, cfg)
        test_images, test_labels, test_classes = list_folder(root / "test", root, cfg)
        if test_classes != classes:
            raise UserError(f"dataset image_folder: '{root}/train' and '{root}/test' have different class folders")
        return FolderData(train_images, train_labels, test_images, test_labels, classes)
    images, labels, classes = list_folder(root, root, cfg)
    train_idx, test_idx = split_folder(labels, classes, root, cfg)
    return FolderData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], classes)


def split_folder(
    labels: torch.Tensor, classes: list[str], root: Path, cfg: ImageFolderConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The train and test positions of a folder without train/ and test/: ``test_fraction`` of each class, drawn with
    ``split_seed``; a one-line UserError when a class would be left without a train or a test image."""
    counts = torch.bincount(labels, minlength=len(classes))
    smallest = int(counts.argmin())
    if counts[smallest] < 2:
        raise UserError(
            f"dataset image_folder: class folder '{root / classes[smallest]}' has {int(counts[smallest])} "
            f"image(s); each class needs 2 or more to be split into train and test (or give '{root}/train' "
            f"and '{root}/test')"
        )
    try:
        train_idx, test_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=cfg.test_fraction,
            stratify=labels.numpy(),
            random_state=cfg.split_seed,
        )
    except ValueError:  # fewer test (or train) images than classes
        train_idx = test_idx = np.array([], dtype=np.int64)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    if any(len(torch.unique(labels[part])) < len(classes) for part in (train_idx, test_idx)):
        raise UserError(
            f"dataset.test_fraction={cfg.test_fraction} leaves a class of '{root}' without a train or a "
            f"test image ({len(labels)} images, {len(classes)} classes, the smallest of "
            f"{int(counts[smallest])}); choose a fraction that gives each class both"
        )
    return train_idx, test_idx


def stream_image_folder(cfg: ImageFolderConfig, root: Path) -> FolderData:
    """What ``load_dataset`` gives for the folder (``max_train``/``max_test`` drawn the same way), left on disk."""
    data = open_image_folder(cfg, root)
    train_images, train_labels = _subset(data.train_images, data.train_labels, cfg.max_train)
    test_images, test_labels = _subset(data.test_images, data.test_labels, cfg.max_test)
    return FolderData(train_images, train_labels.long(), test_images, test_labels.long(), data.classes)


@DATASETS.register("image_folder", ImageFolderConfig)
def load_image_folder(cfg: ImageFolderConfig, root: Path) -> ImageData:
    """The folder decoded into tensors. ``load_dataset``'s fingerprints of them hash the pixels; the stages open the
    folder through ``stream_image_folder``, whose fingerprints hash the files."""
    return open_image_folder(cfg, root).decoded()
