#!/usr/bin/env python
"""Caching through an encoder made elsewhere: torchvision's ResNet-50 (random weights saved to a local checkpoint)
at 224 px on Fashion-MNIST images, through `sslfuse cache +external...`, against a bare PyTorch loop over the same
images converted up front, in the same run and precision.

    .venv/bin/python scripts/external_throughput.py                       # 2,000 train + 500 test images
    .venv/bin/python scripts/external_throughput.py --train 500 --test 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torchvision

from ssl_fusion.data.datasets import load_dataset
from ssl_fusion.models.external import ExternalEncoder, ExternalEncoderConfig
from ssl_fusion.runtime.device import autocast, resolve_device, resolve_precision


def external_overrides(checkpoint: Path, size: int) -> list[str]:
    """The `+external.r50.*` declaration of the ResNet-50 checkpoint read at ``size`` px."""
    return [
        "+external.r50.arch=torchvision:resnet50",
        f"+external.r50.checkpoint={checkpoint}",
        f"+external.r50.image_size={size}",
    ]


def cached_images_per_second(
    workdir: Path, checkpoint: Path, train: int, test: int, size: int, extra: Sequence[str] = ()
) -> float:
    """images/s that `sslfuse cache` records in the features' manifest (encoding, conversion and writing); ``extra``
    overrides go to the command too (dataset, device, precision)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ssl_fusion.cli",
            "cache",
            f"dataset.max_train={train}",
            f"dataset.max_test={test}",
            "pretexts=[r50]",
            *external_overrides(checkpoint, size),
            *extra,
            "hydra.run.dir=cache",
        ],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    )
    (manifest,) = (workdir / "outputs/artifacts/features").glob("r50-*/manifest.json")
    return json.loads(manifest.read_text())["timings"]["images_per_second"]


def bare_images_per_second(
    model: torch.nn.Module,
    images: torch.Tensor,
    size: int,
    batch_size: int,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> float:
    """images/s of model(x) over the same images already converted (gray to RGB, resized, normalised) in memory, on
    ``device`` in ``dtype`` (by default those `precision=auto` picks)."""
    device = device or resolve_device("auto")
    dtype = dtype or resolve_precision("auto", device)
    convert = ExternalEncoder(torch.nn.Identity(), 0, ExternalEncoderConfig(arch="", image_size=size))
    inputs = [
        convert(images[i : i + batch_size].float() / 255).contiguous(memory_format=torch.channels_last).to(device)
        for i in range(0, len(images), batch_size)
    ]
    model = model.to(device, memory_format=torch.channels_last).eval()
    with torch.inference_mode(), autocast(device, dtype):
        model(inputs[0][:8])
        started = time.perf_counter()
        for batch in inputs:
            model(batch)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    with tempfile.TemporaryDirectory(prefix="sslfuse-external-") as scratch:
        workdir = Path(scratch)
        torch.save(model.state_dict(), workdir / "r50.pth")
        ours = cached_images_per_second(workdir, workdir / "r50.pth", args.train, args.test, args.size)
    _, data = load_dataset({"name": "fashion_mnist", "max_train": args.train, "max_test": args.test}, None)
    model.fc = torch.nn.Identity()
    bare = bare_images_per_second(model, torch.cat([data.train_images, data.test_images]), args.size, 250)
    print(
        f"sslfuse cache: {ours:.1f} img/s; bare loop: {bare:.1f} img/s; ratio {ours / bare:.2f} "
        f"(ResNet-50 at {args.size} px, {args.train + args.test} images, precision "
        f"{str(resolve_precision('auto', resolve_device('auto'))).removeprefix('torch.')})"
    )


if __name__ == "__main__":
    main()
