"""The input pipeline on a GPU, checked on the CPU: which in-memory datasets stay on the device (and that their
batches are those read from host memory), image-folder DataLoaders kept across epochs, the backend flags set on CUDA
only, and ``train.compile``: in the encoder's key, wired to the encoder's forward, its weights stored unprefixed."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from ssl_fusion.config import ProbeConfig, TrainOverrides
from ssl_fusion.data import batches
from ssl_fusion.data.batches import RESIDENT_MAX_BYTES, auto_workers, keeps_resident, kept_loader, uint8_batches
from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.models.encoders import Encoder, SmallCNNConfig, build_encoder
from ssl_fusion.runtime import device as device_module
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.pretrain import ensure_encoder, train_encoder
from ssl_fusion.store.artifacts import ENCODERS_KIND, encoder_artifact, pretext_recipe
from ssl_fusion.store.files import ArtifactStore
from tests.test_streaming import open_folder, write_folder

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def context(tmp_path: Path, **overrides) -> StageContext:
    """Rotation of small_cnn on 48 synthetic 12-pixel images: an epoch of 3 steps of 8 images."""
    return StageContext(
        data=make_synthetic(SyntheticConfig(name="synthetic", n_train=48, n_test=16, image_size=12), tmp_path),
        dataset_cfg=SyntheticConfig(name="synthetic"),
        encoder_cfg=SmallCNNConfig(name="small_cnn"),
        device=CPU,
        dtype=torch.float32,
        store=ArtifactStore(tmp_path / "store"),
        overrides=TrainOverrides(max_steps_per_epoch=3, **overrides),
        seed=0,
        backends=device_module.configure_backends(CPU, False),
    )


def recipe():
    return dataclasses.replace(pretext_recipe("rotation", TrainOverrides()), batch_size=8, epochs=1)


def test_only_a_tensor_within_the_limit_on_a_gpu_stays_on_the_device():
    """The choice by device and size, at the limit and one byte past it; a dataset (on disk) never; on the CPU the
    images are left as they are."""
    assert keeps_resident(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), CUDA)
    assert not keeps_resident(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), CPU)
    assert keeps_resident(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), CUDA, max_bytes=4 * 3 * 8 * 8)
    assert not keeps_resident(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), CUDA, max_bytes=4 * 3 * 8 * 8 - 1)
    assert not keeps_resident(torch.utils.data.TensorDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8)), CUDA)
    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    assert batches.resident(images, CPU) is images


def test_gathered_batches_equal_the_host_batches_and_are_never_pinned_off_the_host():
    """Batches of an epoch's order, gathered where the images are (the resident path: the order moved there once, no
    pinning) equal the rows of the order one by one (known truth); consecutive slices too."""
    images = torch.randint(0, 256, (21, 3, 4, 4), dtype=torch.uint8)
    order = torch.randperm(21, generator=torch.Generator().manual_seed(0))
    gathered = list(batches.tensor_batches(images, 8, False, order))
    assert [len(batch) for batch in gathered] == [8, 8, 5]
    assert torch.equal(torch.cat(gathered), torch.stack([images[i] for i in order.tolist()]))
    assert torch.equal(torch.cat(list(uint8_batches(images, 8, False, 0))), images)


def test_pretraining_with_the_images_kept_resident_learns_the_weights_read_from_host_memory(tmp_path, monkeypatch):
    """The resident path forced on (the CPU standing for the device): the stage hands the trainer what ``resident``
    gives, and the encoder is exactly that trained without it (paired comparison)."""
    ctx = context(tmp_path)
    plain, _ = train_encoder(ctx, recipe(), "rotation-plain")
    chosen: list = []

    def always(images, device, max_bytes=RESIDENT_MAX_BYTES) -> bool:
        chosen.append((images, device))
        return True

    monkeypatch.setattr(batches, "keeps_resident", always)
    kept, _ = train_encoder(ctx, recipe(), "rotation-kept")
    assert chosen and chosen[0][0] is ctx.data.train_images and chosen[0][1] == CPU
    assert all(torch.equal(kept.state_dict()[key], value) for key, value in plain.state_dict().items())


@pytest.mark.parametrize("cpus, local_ranks, workers", [(64, 1, 8), (32, 8, 4), (2, 1, 2), (2, 4, 0)])
def test_the_default_worker_count_shares_the_cpus_among_the_local_ranks(monkeypatch, cpus, local_ranks, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert auto_workers() == workers


def test_an_image_folder_keeps_its_loader_and_workers_across_epochs(tmp_path):
    """Three passes in three seeded orders, the second abandoned half-way (as a resumed epoch is): each gives the
    decoded images in its order (known truth), all from one DataLoader whose worker processes stay the same."""
    write_folder(tmp_path / "images", total=24)
    images = open_folder(tmp_path / "images").train_images
    decoded = images.materialise()
    pids = []
    for epoch in range(3):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
        read = []
        for batch in uint8_batches(images, 4, False, 2, order):
            read.append(batch)
            if epoch == 1 and len(read) == 2:
                break
        assert torch.equal(torch.cat(read), decoded[order[: 4 * len(read)]]), epoch
        loader = kept_loader(images, 2, False)
        pids.append([worker.pid for worker in loader._iterator._workers])
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]


@pytest.mark.parametrize("deterministic", [False, True])
def test_backend_flags_are_set_on_cuda_only_and_reported(monkeypatch, deterministic):
    """On the CPU nothing is touched; on CUDA cuDNN autotunes (unless runs must be deterministic) and fp32 matmuls
    take TF32, and the flags returned (for the manifest) are those set."""
    precisions: list[str] = []
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", precisions.append)
    assert device_module.configure_backends(CPU, deterministic) == {"cudnn_benchmark": False, "tf32": False}
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, precisions) == (False, False, [])
    flags = device_module.configure_backends(CUDA, deterministic)
    assert flags == {"cudnn_benchmark": not deterministic, "tf32": True}
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == (not deterministic, True)
    assert precisions == ["high"]


def test_compile_is_in_the_key_wraps_the_encoder_and_stores_unprefixed_weights(tmp_path, monkeypatch):
    """``train.compile=true``: another encoder key; the encoder's forward goes through ``torch.compile`` (recorded,
    then compiled for real with dynamo's eager backend: tracing without code generation, quick on a CPU); training
    runs; the stored weights have the keys of an uncompiled encoder and the manifest says it was compiled."""
    compiled = context(tmp_path, compile=True)
    assert encoder_artifact(compiled, recipe(), 3) != encoder_artifact(context(tmp_path), recipe(), 3)
    calls = []
    real = torch.compile

    def recording(model, *args, **kwargs):
        calls.append(getattr(model, "__self__", model))
        return real(model, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", recording)
    name, manifest, reused = ensure_encoder(compiled, recipe(), ProbeConfig(max_train=32, max_test=16))
    assert not reused and len(calls) == 1 and isinstance(calls[0], Encoder)
    assert manifest["runtime"]["compile"] is True and manifest["runtime"]["cudnn_benchmark"] is False
    stored = torch.load(compiled.store.folder(ENCODERS_KIND, name) / "encoder.pt", weights_only=True)
    assert stored.keys() == build_encoder(SmallCNNConfig(name="small_cnn"), 3).state_dict().keys()
