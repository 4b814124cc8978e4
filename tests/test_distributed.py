"""Data-parallel pretraining and caching under torchrun (gloo, two CPU processes) match one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import sslfuse

from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import simclr, vicreg
from ssl_fusion.pretexts.trainer import epoch_order
from ssl_fusion.runtime import distributed
from ssl_fusion.store.files import ArtifactStore

GLOBAL_BATCH = 16
N_IMAGES = 40


def fixed_views(images: torch.Tensor, cfg: object) -> torch.Tensor:
    """Deterministic stand-in for the random two-view augmentation, so one process and two see the same views."""
    return torch.cat([images, images.flip(3) * 0.8 + 0.1]).contiguous(memory_format=torch.channels_last)


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn"), 1)
    if name == "simclr":
        model = simclr.SimCLR(simclr.SimCLRConfig(name="simclr", projection_hidden=32, projection_dim=16), encoder)
    else:
        model = vicreg.VICReg(vicreg.VICRegConfig(name="vicreg", expander_dim=32), encoder)
    return model.to(memory_format=torch.channels_last)


def first_step(name: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of the first training step on the global batch, as the trainer
    computes them: the seeded epoch order, this rank's share of it, synced BatchNorm and, under a process
    group, the loss through DistributedDataParallel, which averages the gradients over ranks."""
    torch.set_num_threads(1)
    images = torch.rand(N_IMAGES, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    model = build_model(name)
    local = distributed.local_order(epoch_order(N_IMAGES, seed=0, epoch=0))[
        : distributed.local_batch_size(GLOBAL_BATCH)
    ]
    loss_of = distributed.prepare_training(model, torch.device("cpu"), type(model).sync_batchnorm)
    loss = loss_of(images[local], torch.zeros(len(local)))
    loss.backward()
    return float(loss.detach()), {key: p.grad.clone() for key, p in model.named_parameters()}


def ddp_worker(rank: int, name: str, port: int, out: Path) -> None:
    simclr.two_views = vicreg.two_views = fixed_views  # a spawned process of its own: nothing to restore
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(first_step(name), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "vicreg"])
def test_two_processes_give_the_loss_and_gradients_of_one(tmp_path, monkeypatch, name):
    """Two gloo processes, each on half of the global batch, give the loss and the averaged gradients of one process
    on all of it, up to float32 rounding: they sum in another order. On some machines VICReg's gradients differed by
    up to 1.5e-5 where they reach 4.9 (relative 3e-6), above a per-element atol of 1e-5. So each gradient tensor is
    compared with rtol 1e-4 and an atol of 1e-4 times its largest magnitude, at least 1e-5: the biases that feed a
    BatchNorm (and VICReg's last bias, its loss being shift-invariant) have zero gradient in exact arithmetic, and
    what they get is rounding noise of 1e-7 to 1e-6. That still fails a gradient that is summed instead of averaged
    (2x) or a rank that drops its half of the batch."""
    mp.spawn(ddp_worker, args=(name, free_port(), tmp_path), nprocs=2, join=True)
    monkeypatch.setattr(simclr, "two_views", fixed_views)
    monkeypatch.setattr(vicreg, "two_views", fixed_views)
    loss, grads = first_step(name)
    for rank in range(2):
        rank_loss, rank_grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert rank_loss == pytest.approx(loss, rel=1e-5), rank
        assert rank_grads.keys() == grads.keys()
        for key, grad in grads.items():
            atol = max(1e-4 * float(grad.abs().max()), 1e-5)
            torch.testing.assert_close(
                rank_grads[key], grad, rtol=1e-4, atol=atol, msg=f"rank {rank}: gradient of {key}"
            )


def test_outside_torchrun_the_helpers_are_the_identity():
    tensor = torch.arange(6.0).view(3, 2)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather(tensor) is tensor and distributed.average(tensor) is tensor
    assert torch.equal(distributed.local_order(torch.arange(5)), torch.arange(5))
    assert distributed.shard_bounds(7) == (0, 7) and distributed.local_batch_size(6) == 6


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m ssl_fusion.cli <args>`` on the CPU."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ssl_fusion.cli",
        *args,
    ]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


SMOKE = ["preset=smoke", "device=cpu", "precision=fp32", "artifacts_dir=store"]  # one precision: it is in the keys


@pytest.fixture(scope="module")
def ddp_workspace(tmp_path_factory) -> Path:
    """A folder whose store holds a SimCLR encoder pretrained by two processes."""
    folder = tmp_path_factory.mktemp("ddp")
    proc = torchrun("pretrain", "pretext=simclr", *SMOKE, cwd=folder)
    assert proc.stdout.count(" (trained): ") == 1, proc.stdout  # only rank 0 reports
    return folder


@pytest.mark.slow
def test_torchrun_pretraining_stores_exactly_one_valid_encoder(ddp_workspace):
    store = ArtifactStore(ddp_workspace / "store")
    (folder,) = (ddp_workspace / "store" / "encoders").glob("simclr-*")
    manifest = store.manifest("encoders", folder.name)  # checks every file's hash
    assert manifest is not None and manifest["runtime"]["processes"] == 2
    assert len(manifest["metrics"]["epoch_losses"]) == 1 and np.isfinite(manifest["metrics"]["final_loss"])
    encoder = build_encoder(SmallCNNConfig(name="small_cnn"), 1)
    encoder.load_state_dict(torch.load(folder / "encoder.pt", weights_only=True))
    assert not list((ddp_workspace / "store" / "encoders").glob(".staging-*"))
    assert not list((ddp_workspace / "store").glob("checkpoints/*/last.pt")), "rank 0 removes the checkpoint"
    run_dirs = [p.parent for p in (ddp_workspace / "outputs" / "runs" / "pretrain").glob("*/*/.hydra")]
    assert len(run_dirs) == 1, "only rank 0 makes a run folder"


@pytest.mark.slow
def test_two_rank_cache_equals_one_process_cache(ddp_workspace):
    single = ddp_workspace / "single"
    shutil.copytree(ddp_workspace / "store" / "encoders", single / "store" / "encoders")
    args = ["cache", "pretexts=[simclr]", "cache.batch_size=100", *SMOKE]
    torchrun(*args, cwd=ddp_workspace)
    sslfuse(*args, "hydra.run.dir=single_run", cwd=single)
    (two,) = (ddp_workspace / "store" / "features").glob("simclr-*")
    (one,) = (single / "store" / "features").glob("simclr-*")
    assert two.name == one.name, "the same artifact key"
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (two, one)]
    assert [m["runtime"]["processes"] for m in manifests] == [2, 1]
    assert (
        manifests[0]["files"].keys()
        == manifests[1]["files"].keys()
        == {"train.npy", "test.npy", "train_labels.npy", "test_labels.npy"}
    )
    for stem in ("train", "test"):
        merged, reference = np.load(two / f"{stem}.npy"), np.load(one / f"{stem}.npy")
        assert merged.dtype == reference.dtype == np.float16 and merged.shape == reference.shape
        np.testing.assert_allclose(merged.astype(np.float32), reference.astype(np.float32), rtol=1e-3, atol=1e-3)
        assert np.array_equal(np.load(two / f"{stem}_labels.npy"), np.load(one / f"{stem}_labels.npy"))
