"""Images in uint8 batches, from a tensor in memory or read from disk by DataLoader workers: what caching and
pretraining feed their encoders."""

from __future__ import annotations

import functools
import os
from typing import Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ssl_fusion.runtime.errors import UserError

# uint8 (N, C, H, W) in memory, or a dataset whose items are uint8 (C, H, W) and whose ``shape`` is (N, C, H, W)
Images = Union[torch.Tensor, Dataset]


class ReadOrReport(Dataset):
    """The items of ``images`` paired with the UserError an unreadable one raises ("" when read): raised in a
    DataLoader worker, the error would come back wrapped in the worker's traceback instead of as one line."""

    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return self.images[index], ""
        except UserError as err:
            return torch.zeros(self.images.shape[1:], dtype=torch.uint8), str(err)


# The largest uint8 tensor of images kept on a GPU for a whole pretraining (CIFAR-10's train split is 154 MB): its
# batches are then gathered there, with no host-to-device copy per step; a larger one stays in host memory.
RESIDENT_MAX_BYTES = 200 * 10**6
MAX_AUTO_WORKERS = 8


def keeps_resident(images: Images, device: torch.device, max_bytes: int = RESIDENT_MAX_BYTES) -> bool:
    """Whether ``images`` live on ``device`` while it trains on them: a tensor in memory of at most ``max_bytes``,
    and a GPU."""
    return device.type == "cuda" and isinstance(images, torch.Tensor) and images.nbytes <= max_bytes


def resident(images: Images, device: torch.device) -> Images:
    """``images`` moved onto ``device`` where ``keeps_resident`` says so, else as they are (on the CPU: unchanged)."""
    return images.to(device) if keeps_resident(images, device) else images


def auto_workers() -> int:
    """The default number of DataLoader workers: the CPUs this process may use shared among the processes torchrun
    started on this machine, at most ``MAX_AUTO_WORKERS``."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux, others
    return min(MAX_AUTO_WORKERS, cpus // local_ranks)


class EpochBatches:
    """A DataLoader's batch sampler whose batches (lists of indices) are set before each pass: a loader kept across
    epochs reads each epoch's order through it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@functools.lru_cache(maxsize=2)
def kept_loader(images: Dataset, workers: int, pin: bool) -> DataLoader:
    """One DataLoader of ``images`` per process, its ``workers`` kept between passes (``persistent_workers``): an epoch
    does not start new processes. One pass at a time; the loaders of the last two datasets read are kept."""
    return DataLoader(
        ReadOrReport(images),
        batch_sampler=EpochBatches(),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=True,
        generator=torch.Generator(),  # its own: a seed drawn from the global RNG would shift later augmentations
    )


def uint8_batches(
    images: Images, batch_size: int, pin: bool, num_workers: Optional[int], order: Optional[torch.Tensor] = None
) -> Iterator[torch.Tensor]:
    """uint8 batches of ``images`` (in pinned memory when ``pin`` and they are in host memory), consecutive or of
    ``order``'s indices in turn: slices of a tensor (gathered on its device), or a DataLoader's batches of a dataset,
    read by ``num_workers`` processes (None: ``auto_workers``; 0: this one; one batch or less gets none)."""
    if isinstance(images, torch.Tensor):
        yield from tensor_batches(images, batch_size, pin and images.device.type == "cpu", order)
        return
    count = len(images) if order is None else len(order)
    batches = [chunk.tolist() for chunk in (torch.arange(count) if order is None else order).split(batch_size)]
    workers = (auto_workers() if num_workers is None else num_workers) if count > batch_size else 0
    if workers:
        loader = kept_loader(images, workers, pin)
        loader.batch_sampler.batches = batches
    else:
        loader = DataLoader(ReadOrReport(images), batch_sampler=batches, pin_memory=pin, generator=torch.Generator())
    for batch, problems in loader:
        problem = next((text for text in problems if text), None)
        if problem is not None:
            raise UserError(problem)
        yield batch


def tensor_batches(
    images: torch.Tensor, batch_size: int, pin: bool, order: Optional[torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``images``, or its rows of each ``batch_size`` of ``order``'s indices (moved to the
    images' device once, so a tensor on a GPU is gathered there without a copy per batch)."""
    if order is None:
        batches = (images[start : start + batch_size] for start in range(0, len(images), batch_size))
    else:
        batches = (images[chunk] for chunk in order.to(images.device).split(batch_size))
    for batch in batches:
        yield batch.pin_memory() if pin else batch


def decoded(images: Images) -> torch.Tensor:
    """``images`` as one uint8 tensor: a tensor as it is, a dataset (a few images, e.g. a sample) read whole."""
    if isinstance(images, torch.Tensor):
        return images
    return next(uint8_batches(images, len(images), pin=False, num_workers=0))
