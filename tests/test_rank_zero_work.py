"""What rank 0 does while the other ranks wait: the probes run on the stage's device (their scores those of the
features in host memory), and an image folder is fingerprinted once, by rank 0, the others getting its result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_fusion.config import ProbeConfig
from ssl_fusion.evaluation.probe import extract_features, knn_accuracy, linear_probe_accuracy, probe_subset
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.stages.pretrain import probe_encoder
from tests.test_distributed import free_port
from tests.test_input_pipeline import context
from tests.test_streaming import open_folder, write_folder


def test_the_probes_on_the_device_score_what_they_score_on_host_features(tmp_path):
    """``probe_encoder`` keeps the features on the stage's device and probes there; on the CPU its scores are those
    of the features extracted into host memory and probed there (paired comparison)."""
    ctx, probe = context(tmp_path), ProbeConfig(max_train=40, max_test=16, k=5)
    torch.manual_seed(0)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn"), ctx.data.channels)
    train_images, train_labels = probe_subset(ctx.data.train_images, ctx.data.train_labels, probe.max_train)
    test_images, test_labels = probe_subset(ctx.data.test_images, ctx.data.test_labels, probe.max_test)
    bank = extract_features(encoder, train_images, 1024, ctx.device, ctx.dtype)
    queries = extract_features(encoder, test_images, 1024, ctx.device, ctx.dtype)
    on_host = {
        "knn_accuracy": knn_accuracy(bank, train_labels, queries, test_labels, k=5, num_classes=ctx.data.num_classes),
        "linear_accuracy": linear_probe_accuracy(bank, train_labels, queries, test_labels, l2=probe.linear_l2),
    }
    assert probe_encoder(ctx, encoder, probe) == on_host


def fingerprint_worker(rank: int, port: int, folder: Path, out: Path) -> None:
    """Join a 2-process gloo group, count the files this rank reads (``Path.read_bytes``: what the fingerprint hashes)
    while taking the folder's fingerprints, and save both."""
    data = open_folder(folder)  # listed on every rank, as each stage opens its dataset before the group exists
    reads = []
    read_bytes = Path.read_bytes

    def counted(path: Path) -> bytes:
        reads.append(path)
        return read_bytes(path)

    Path.read_bytes = counted  # a spawned process of its own: nothing to restore
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        fingerprints = data.fingerprints
        torch.save({"reads": len(reads), "fingerprints": fingerprints}, out / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_zero_alone_reads_an_image_folder_to_fingerprint_it(tmp_path):
    """Two gloo processes take the fingerprints of a folder of 24 images: rank 0 reads each file once, rank 1 none,
    and both hold the fingerprints a single process takes (known truth)."""
    write_folder(tmp_path / "images", total=24)
    mp.spawn(fingerprint_worker, args=(free_port(), tmp_path / "images", tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert [rank["reads"] for rank in ranks] == [24, 0]
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"] == open_folder(tmp_path / "images").fingerprints
