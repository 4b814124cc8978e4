"""Writing features off the device behind the computation: each batch is cast to float16 where it was computed, copied
without waiting into a (pinned, on a GPU) host buffer, and written into its array (a .npy memory map) by one
background thread, so that the device encodes the next batch meanwhile."""

from __future__ import annotations

import queue
import threading
from typing import Optional

import numpy as np
import torch


class FeatureWriter:
    """Writes batches of features into ``out`` from a thread, through ``buffers`` reusable host buffers: a buffer
    goes back to the pool only once the thread has written it, after its copy from the device is done (a CUDA event
    per copy), so no copy overwrites rows not yet written. An error of the thread (a full disk) is raised in the
    caller, by the next ``write`` or by ``close``; use it as a context manager, which always stops the thread."""

    def __init__(self, out: np.ndarray, device: torch.device, buffers: int = 2) -> None:
        self.out, self.device = out, device
        self.pool: queue.Queue[Optional[torch.Tensor]] = queue.Queue()
        for _ in range(buffers):
            self.pool.put(None)  # allocated at the first batch, to its size
        self.jobs: queue.Queue = queue.Queue(maxsize=buffers + 1)  # every buffer in flight, and the stop
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self.run, name="feature-writer", daemon=True)
        self.thread.start()

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(raise_error=exc_info[0] is None)

    def write(self, rows: tuple, features: torch.Tensor) -> None:
        """Queue ``features`` (on the device, any float dtype) for ``out[rows]`` (``rows``: an index tuple); it
        returns before they are written."""
        self.raise_error()
        half = features.detach().to(torch.float16)
        buffer = self.pool.get()
        if buffer is None or len(buffer) < len(half):
            buffer = torch.empty(half.shape, dtype=torch.float16, pin_memory=self.device.type == "cuda")
        host = buffer[: len(half)]
        host.copy_(half, non_blocking=True)
        copied = None
        if half.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        self.jobs.put((rows, host, buffer, copied))

    def run(self) -> None:
        """The thread: write each queued batch once its copy is done, then give its buffer back; after an error,
        only give the buffers back."""
        while (job := self.jobs.get()) is not None:
            rows, host, buffer, copied = job
            try:
                if self.error is None:
                    if copied is not None:
                        copied.synchronize()
                    self.out[rows] = host.numpy()
            except BaseException as error:  # re-raised in the caller's thread
                self.error = error
            finally:
                self.pool.put(buffer)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, raise_error: bool = True) -> None:
        """Wait for every queued batch to be written and stop the thread; raise its error, if any."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        if raise_error:
            self.raise_error()
