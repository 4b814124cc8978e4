#!/usr/bin/env python
"""Peak memory and speed of caching an image folder that is streamed from disk, as the folder grows: random RGB
PNGs in 10 class folders, cached by `sslfuse cache` through torchvision's ResNet-18 (random weights saved to a
local checkpoint), each run in a fresh process whose peak resident memory is read from wait4 and whose resident
memory is sampled while it runs. For contrast, the
same folder decoded into memory first (what the cache stage did before), and Fashion-MNIST cached from its
in-memory uint8 tensor by slicing against the same tensor read through a DataLoader.

    .venv/bin/python scripts/streaming_memory.py                          # 4,000 and 16,000 images of 64 px
    .venv/bin/python scripts/streaming_memory.py --sizes 400 1600 --fashion-mnist 2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset

CLASSES = 10
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_folder(root: Path, count: int, size: int) -> None:
    """``count`` seeded random RGB PNGs of ``size`` px in ``CLASSES`` class folders."""
    generator = np.random.default_rng(count)
    for index in range(count):
        folder = root / f"class{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")


def resident_mib(pid: int) -> float:
    """The process's resident memory now (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


def measured(command: list[str], cwd: Path) -> dict:
    """Run ``command``: its peak resident memory in MiB (the process or its largest worker, from wait4), the median
    of its own resident memory sampled every 0.1 s (the level it works at, which a passing spike does not move),
    and its wall seconds."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=CHILD_ENV, stdout=log, stderr=subprocess.STDOUT)
        samples = []
        while True:  # wait4, not Popen.poll: the rusage comes with the reaping
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            samples.append(resident_mib(proc.pid))
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read()}")
    level = float(np.median([sample for sample in samples if sample > 0]))
    return {"peak_mib": usage.ru_maxrss / 1024, "median_mib": level, "wall_s": time.perf_counter() - started}


def cache_folder(workdir: Path, folder: Path, checkpoint: Path, size: int, workers: int, batch_size: int) -> dict:
    """`sslfuse cache` of the folder, streamed; images/s as the features' manifest records it."""
    command = [
        sys.executable,
        "-m",
        "ssl_fusion.cli",
        "cache",
        "dataset=image_folder",
        f"data_dir={folder}",
        f"dataset.image_size={size}",
        "pretexts=[r18]",
        "+external.r18.arch=torchvision:resnet18",
        f"+external.r18.checkpoint={checkpoint}",
        f"cache.num_workers={workers}",
        f"cache.batch_size={batch_size}",
        "train.num_threads=1",
        "precision=fp32",
        "hydra.run.dir=cache",
    ]
    memory = measured(command, workdir)
    (manifest,) = (workdir / "outputs/artifacts/features").glob("r18-*/manifest.json")
    return {**memory, "images_per_second": json.loads(manifest.read_text())["timings"]["images_per_second"]}


def child_run(script_args: list[str], workdir: Path) -> dict:
    """This script's ``--child`` mode in a fresh process: its report, with the peak memory wait4 gives."""
    report = workdir / "report.json"
    memory = measured([sys.executable, __file__, "--child", *script_args, "--report", str(report)], workdir)
    return {**json.loads(report.read_text()), **memory}


class TensorImages(Dataset):
    """The items of an in-memory uint8 tensor, for a DataLoader."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.shape = images, images.shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def encode_all(splits: list, checkpoint: Path, channels: int, batch_size: int, workers: int, out: Path) -> float:
    """Features of each split's images through the checkpoint, written batch by batch to a float16 .npy as the
    cache stage writes them; images/s over all splits."""
    from ssl_fusion.evaluation.probe import encode_batches
    from ssl_fusion.models.external import ExternalEncoderConfig, build_external

    encoder, _ = build_external(
        ExternalEncoderConfig(arch="torchvision:resnet18", checkpoint=str(checkpoint)), channels
    )
    started = time.perf_counter()
    for images in splits:
        features = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=(len(images), encoder.out_dim))

        def store(offset: int, batch: torch.Tensor, features: np.ndarray = features) -> None:
            features[offset : offset + len(batch)] = batch.numpy().astype(np.float16)

        encode_batches(encoder, images, batch_size, torch.device("cpu"), torch.float32, store, num_workers=workers)
        del features
    return sum(len(images) for images in splits) / (time.perf_counter() - started)


def child(args: argparse.Namespace) -> None:
    """One measured run: Fashion-MNIST (sliced or through a DataLoader), or an image folder decoded into memory."""
    from ssl_fusion.stages.context import open_dataset

    torch.set_num_threads(1)
    out = Path(args.report).with_name("features.npy")
    if args.child == "folder-decoded":
        _, data = open_dataset({"name": "image_folder", "image_size": args.size}, args.data, stream=False)
        splits, channels = [data.train_images, data.test_images], 3
    else:
        _, data = open_dataset({"name": "fashion_mnist", "max_train": args.fashion_mnist}, None, stream=False)
        loader = args.child == "fashion-mnist-loader"
        splits, channels = [TensorImages(data.train_images) if loader else data.train_images], 1
    rate = encode_all(splits, Path(args.checkpoint), channels, args.batch_size, args.workers, out)
    Path(args.report).write_text(
        json.dumps({"images": sum(len(images) for images in splits), "images_per_second": rate})
    )


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="sslfuse-streaming-") as scratch:
        scratch = Path(scratch)
        checkpoint = scratch / "r18.pth"
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
        common = ["--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size), "--size", str(args.size)]
        for count in args.sizes:
            folder = scratch / f"folder{count}"
            write_folder(folder, count, args.size)
            for name in ("streamed", "decoded"):
                workdir = scratch / f"{name}{count}"
                workdir.mkdir()
                if name == "streamed":
                    row = cache_folder(workdir, folder, checkpoint, args.size, args.workers, args.batch_size)
                else:
                    row = child_run(["folder-decoded", "--data", str(folder), "--workers", "0", *common], workdir)
                rows.append({"data": f"image folder, {count:,} x {args.size} px", "path": name, **row})
                print(json.dumps(rows[-1]), flush=True)
        for name, workers in (("fashion-mnist-memory", 0), ("fashion-mnist-loader", args.workers)):
            workdir = scratch / name
            workdir.mkdir()
            row = child_run(
                [name, "--fashion-mnist", str(args.fashion_mnist), "--workers", str(workers), *common], workdir
            )
            rows.append(
                {
                    "data": f"Fashion-MNIST, {args.fashion_mnist:,} x 28 px",
                    "path": name.removeprefix("fashion-mnist-"),
                    **row,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000], help="images in each generated folder")
    parser.add_argument("--size", type=int, default=64, help="pixels a side of the generated images")
    parser.add_argument("--fashion-mnist", type=int, default=10000, help="Fashion-MNIST train images to cache")
    parser.add_argument("--workers", type=int, default=2, help="cache.num_workers of the streamed runs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--child", choices=["folder-decoded", "fashion-mnist-memory", "fashion-mnist-loader"])
    parser.add_argument("--data")
    parser.add_argument("--checkpoint")
    parser.add_argument("--report")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"batch size {args.batch_size}, {args.workers} workers on the streamed runs")
    print("| data | path | peak RSS (MiB) | median RSS (MiB) | images/s | wall (s) |\n|---|---|--:|--:|--:|--:|")
    for row in run(args):
        print(
            f"| {row['data']} | {row['path']} | {row['peak_mib']:.0f} | {row['median_mib']:.0f} | "
            f"{row['images_per_second']:.0f} | {row['wall_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
