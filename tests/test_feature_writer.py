"""Features written off the device by a background thread: the bytes the synchronous path wrote (float32 on the
host, then numpy's float16), buffers never overwritten before they are written, and a failed write raised in the
caller with nothing left in the store."""

from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest
import torch
from conftest import synthetic_context

from ssl_fusion.config import CacheConfig
from ssl_fusion.data.augment import shift_flip, shift_flip_params
from ssl_fusion.evaluation.probe import encode_batches, extract_features
from ssl_fusion.models.external import ExternalEncoderConfig
from ssl_fusion.pretexts import Pretext
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.progress import image_progress
from ssl_fusion.stages import caching
from ssl_fusion.stages.caching import ensure_external_features, write_split, write_views
from ssl_fusion.stages.feature_writer import FeatureWriter


def hard_values() -> torch.Tensor:
    """float32 values where a float16 cast can go wrong: every exponent, ties of rounding, float16's subnormals,
    its largest value and beyond, infinities and signed zeros."""
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(20000, generator=generator) * torch.exp2(torch.randint(-30, 20, (20000,), generator=generator))
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    ties = (halves[:-1] + halves[1:]) / 2  # half-way between neighbouring float16 values
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, float("inf"), float("-inf"), 6e-8, 3e-8])
    values = torch.cat([spread, halves, ties, edges])
    return values[~values.isnan()]  # NaN payloads are refused by check_features anyway


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_casting_on_the_device_gives_the_bits_of_numpys_cast_of_the_float32_copy(dtype):
    """The features of an encoder under autocast (bfloat16) or not: cast to float16 by torch where they are, the
    same bits as the former path, float32 on the host then ``astype(np.float16)``."""
    values = hard_values().to(dtype)
    direct = values.to(torch.float16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):  # beyond 65504: infinity, as torch gives
        former = values.float().numpy().astype(np.float16).view(np.uint16)
    assert np.array_equal(direct, former)


class SlowArray:
    """An array whose writes take a while and which may fail like a full disk at its ``fail_at``-th write."""

    def __init__(self, array: np.ndarray, fail_at: int | None = None) -> None:
        self.array, self.fail_at, self.writes = array, fail_at, 0

    def __setitem__(self, index, value) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        time.sleep(0.002)
        self.array[index] = value

    def flush(self) -> None:
        pass


def test_a_slow_writer_writes_every_batch_once_its_buffer_is_free():
    """Two buffers and a writer slower than the caller: each buffer is refilled only after it was written, so the
    array holds every batch as given (batches of varying size, into a 3-d array like the views')."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(size, 5, generator=generator) for size in (7, 7, 3, 7, 1, 7, 7, 2) * 3]
    expected = np.zeros((3, 41, 5), np.float16)
    written = SlowArray(np.zeros_like(expected))
    with FeatureWriter(written, torch.device("cpu"), buffers=2) as writer:
        for view in range(3):
            offset = 0
            for batch in batches[view * 8 : (view + 1) * 8]:
                writer.write((view, slice(offset, offset + len(batch))), batch)
                expected[view, offset : offset + len(batch)] = batch.numpy().astype(np.float16)
                offset += len(batch)
    assert written.writes == 24
    assert np.array_equal(written.array.view(np.uint16), expected.view(np.uint16))


def test_a_failed_write_is_raised_in_the_caller():
    written = SlowArray(np.zeros((40, 5), np.float16), fail_at=3)
    with pytest.raises(OSError) as caught:
        with FeatureWriter(written, torch.device("cpu")) as writer:
            for offset in range(0, 40, 4):
                writer.write((slice(offset, offset + 4),), torch.ones(4, 5))
    assert caught.value.errno == errno.ENOSPC
    assert not writer.thread.is_alive()


def tiny_encoder(channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(channels, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    encoder.out_dim = 6
    return encoder


def test_write_split_stores_the_bytes_of_the_synchronous_path(tmp_path):
    """The cached split and views: byte for byte the float32 features of the same batches, cast by numpy."""
    ctx = synthetic_context(tmp_path / "store", 45, 20)  # batches of 8 leave a short last one
    encoder = tiny_encoder(ctx.data.channels)
    cache = CacheConfig(batch_size=8, views=2)
    with image_progress(enabled=False) as progress:
        write_split(ctx, encoder, "train", 8, tmp_path, progress, Pretext)
        write_views(ctx, encoder, Pretext, cache, tmp_path, progress)
    former = extract_features(encoder, ctx.data.train_images, 8, ctx.device, ctx.dtype).numpy().astype(np.float16)
    assert np.array_equal(np.load(tmp_path / "train.npy").view(np.uint16), former.view(np.uint16))
    for view, stored in enumerate(np.load(tmp_path / "train_views.npy")):
        params = shift_flip_params(45, cache.views_max_shift, generator=torch.Generator().manual_seed(view))
        former = np.zeros_like(stored)

        def keep(offset: int, features: torch.Tensor) -> None:
            former[offset : offset + len(features)] = features.float().cpu().numpy().astype(np.float16)

        def augment(offset: int, batch: torch.Tensor) -> torch.Tensor:
            return shift_flip(batch, params[offset : offset + len(batch)])

        encode_batches(encoder, ctx.data.train_images, 8, ctx.device, ctx.dtype, keep, augment, Pretext.encoder_input)
        assert np.array_equal(stored.view(np.uint16), former.view(np.uint16))


def test_a_full_disk_while_caching_is_one_line_and_leaves_nothing_in_the_store(tmp_path, monkeypatch):
    """The writer thread meets a full disk at its third batch: the caller gets the store's one-line refusal, and
    neither an artifact nor a staging folder is left."""
    opened = caching.open_features
    monkeypatch.setattr(caching, "open_features", lambda path, shape: SlowArray(opened(path, shape), fail_at=3))
    ctx = synthetic_context(tmp_path / "store", 45, 20)  # batches of 8 leave a short last one
    external = ExternalEncoderConfig(arch="torchvision:resnet18", image_size=16)
    with pytest.raises(UserError, match="no space left on the device") as caught:
        ensure_external_features(ctx, "r18", external, batch_size=8)
    assert "\n" not in str(caught.value)
    left = [path.name for path in (tmp_path / "store" / "features").iterdir()]
    assert left == [".locks"], "no artifact, no staging folder: only the store's lock files"
