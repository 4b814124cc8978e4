"""Images in uint8 batches, from a tensor in memory or read from disk by DataLoader workers: what caching and
pretraining feed their encoders."""

from __future__ import annotations

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


def uint8_batches(
    images: Images, batch_size: int, pin: bool, num_workers: int, order: Optional[torch.Tensor] = None
) -> Iterator[torch.Tensor]:
    """uint8 batches of ``images`` (in pinned memory when ``pin``), consecutive or of ``order``'s indices in turn:
    slices of a tensor, or a DataLoader's batches of a dataset, read by ``num_workers`` processes (0: this one;
    one batch or less gets none)."""
    chunks = None if order is None else order.split(batch_size)
    if isinstance(images, torch.Tensor):
        slices = (slice(start, start + batch_size) for start in range(0, len(images), batch_size))
        for index in slices if chunks is None else chunks:
            batch = images[index]
            yield batch.pin_memory() if pin else batch
        return
    count = len(images) if order is None else len(order)
    workers = num_workers if count > batch_size else 0
    batching = {"batch_size": batch_size} if chunks is None else {"batch_sampler": [chunk.tolist() for chunk in chunks]}
    # a generator of its own: drawing the workers' seed from the global one would shift every later augmentation
    loader = DataLoader(
        ReadOrReport(images), num_workers=workers, pin_memory=pin, generator=torch.Generator(), **batching
    )
    for batch, problems in loader:
        problem = next((text for text in problems if text), None)
        if problem is not None:
            raise UserError(problem)
        yield batch


def decoded(images: Images) -> torch.Tensor:
    """``images`` as one uint8 tensor: a tensor as it is, a dataset (a few images, e.g. a sample) read whole."""
    if isinstance(images, torch.Tensor):
        return images
    return next(uint8_batches(images, len(images), pin=False, num_workers=0))
