#!/usr/bin/env python
"""The CUDA check (run by scripts/gpu_check.sh): one SimCLR epoch of a ResNet-18 in bf16, caching its features and
those of an external torchvision ResNet-50 at 224 px (random weights saved to a local checkpoint), a fuse of both,
each through the `sslfuse` command in a fresh store; then each stage's images/s against a bare PyTorch loop on the
same model, batch and precision, measured in the same run (before and after sslfuse's pass; the faster counts).
Then the host syncs per training step of each pretext, counted by torch's sync debug mode.
Prints one Markdown table and writes it (and JSON) to --out.

    .venv/bin/python scripts/gpu_check.py --device cuda --out outputs/gpu_check
    .venv/bin/python scripts/gpu_check.py --device cpu --out /tmp/gpu_check     # tiny sizes: a dry run of the code
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py and external_throughput.py beside this file

from bench import bare_inference, bare_training  # noqa: E402
from external_throughput import (  # noqa: E402
    bare_images_per_second,
    cached_images_per_second,
    external_overrides,
)

from ssl_fusion.config import TrainOverrides, load_option  # noqa: E402
from ssl_fusion.data.datasets import load_dataset  # noqa: E402
from ssl_fusion.models.encoders import ENCODERS, build_encoder  # noqa: E402
from ssl_fusion.pretexts import PRETEXTS  # noqa: E402
from ssl_fusion.runtime.device import (  # noqa: E402
    autocast,
    grad_scaler,
    prepare_model,
    resolve_device,
    resolve_precision,
)
from ssl_fusion.runtime.errors import UserError  # noqa: E402
from ssl_fusion.store.artifacts import pretext_recipe  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SIZES = {
    # GPU: the whole of Fashion-MNIST (or 20,000 synthetic images), one full SimCLR epoch, ResNet-50 at 224 px
    "cuda": {
        "train": 60000,
        "test": 10000,
        "synthetic": {"n_train": 20000, "n_test": 4000},
        "precision": "bf16",
        "train_overrides": {},
        "bare_steps": 40,
        "size": 224,
        "external_batch": 256,
        "external_bare_images": 2048,
        "per_class": 10,
    },
    # CPU dry run: seconds, every code path once
    "cpu": {
        "train": 256,
        "test": 128,
        "synthetic": {"n_train": 256, "n_test": 128},
        "precision": "fp32",
        "train_overrides": {"batch_size": 32, "max_steps_per_epoch": 2},
        "bare_steps": 2,
        "size": 32,
        "external_batch": 32,
        "external_bare_images": 64,
        "per_class": 10,
    },
}


def dataset_overrides(sizes: dict) -> tuple[list[str], dict]:
    """Fashion-MNIST from Debian's files when the machine has them (never downloaded), else generated images; the
    same overrides go to every command so each finds what the one before made."""
    if all((FASHION_MNIST / f).is_file() for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")):
        node = {"name": "fashion_mnist", "download": False, "max_train": sizes["train"], "max_test": sizes["test"]}
    else:
        node = {
            "name": "synthetic",
            "image_size": 28,
            **sizes["synthetic"],
            "max_train": sizes["train"],
            "max_test": sizes["test"],
        }
    overrides = [f"dataset={node['name']}"] + [
        f"dataset.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in node.items() if k != "name"
    ]
    return overrides, node


def sslfuse(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`sslfuse <args>` in ``workdir`` (its store under outputs/artifacts there); its output shown if it fails."""
    proc = subprocess.run([sys.executable, "-m", "ssl_fusion.cli", *args], cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"sslfuse {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def manifest(workdir: Path, kind: str, prefix: str) -> dict:
    (path,) = (workdir / "outputs/artifacts" / kind).glob(f"{prefix}-*/manifest.json")
    return json.loads(path.read_text())


def row(stage: str, ours: float, bare: float) -> dict:
    return {
        "stage": stage,
        "sslfuse_img_s": round(ours, 1),
        "bare_img_s": round(bare, 1),
        "ratio": round(ours / bare, 3),
    }


def host_syncs_per_step(data, encoder_cfg, device: torch.device, dtype: torch.dtype, steps: int = 3) -> dict:
    """Synchronising CUDA calls per training step of each pretext that trains on ``data`` (``syncs_per_step``), a
    ResNet-18 each; empty off CUDA."""
    if device.type != "cuda":
        return {}
    counts = {}
    for name in PRETEXTS.names():
        pretext_cls = PRETEXTS.get(name).impl
        if not pretext_cls.trains:
            continue
        recipe = pretext_cls.adapt(pretext_recipe(name, TrainOverrides()), data)
        try:
            pretext_cls.check(recipe, data)
        except UserError:  # e.g. colorization on grayscale images
            continue
        torch.manual_seed(0)
        model = prepare_model(pretext_cls(recipe, build_encoder(encoder_cfg, data.channels)), device)
        counts[name] = syncs_per_step(
            model, data, min(recipe.batch_size, len(data.train_labels) // (steps + 1)), recipe.lr, device, dtype, steps
        )
    return counts


def syncs_per_step(model, data, batch: int, lr: float, device: torch.device, dtype: torch.dtype, steps: int) -> float:
    """Synchronising CUDA calls per training step as the trainer makes it (autocast, loss, backward, loss scaling,
    AdamW), counted by torch's sync debug mode after a warm-up step; the trainer's own syncs (its loss log every 20
    steps, checkpoints) are not in it."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = grad_scaler(device, dtype)

    def step(index: int) -> None:
        rows = slice(index * batch, (index + 1) * batch)
        images = data.train_images[rows].to(device, non_blocking=True).float().div_(255)
        with autocast(device, dtype):
            loss = model.loss(images, data.train_labels[rows].to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step(0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for index in range(1, steps + 1):
                step(index)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught) / steps


def check(device_name: str, out: Path) -> None:
    sizes = SIZES[device_name]
    device = resolve_device(device_name)
    dtype = resolve_precision(sizes["precision"], device)
    data_args, node = dataset_overrides(sizes)
    common = [
        *data_args,
        "encoder=resnet18",
        f"device={device_name}",
        f"precision={sizes['precision']}",
        *(f"train.{k}={v}" for k, v in sizes["train_overrides"].items()),
    ]
    _, data = load_dataset(node, None)
    encoder_cfg = load_option(ENCODERS, "resnet18")
    recipe = pretext_recipe("simclr", TrainOverrides(**sizes["train_overrides"]))
    rows, started = [], time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="sslfuse-gpu-check-"))

    # (a) one SimCLR epoch of a ResNet-18, against forward + backward + step of the same model on the same batches
    images, labels = data.train_images, data.train_labels
    batch = min(recipe.batch_size, len(images))
    steps = min(sizes["bare_steps"], len(images) // batch)
    torch.manual_seed(0)
    reference = prepare_model(PRETEXTS.get("simclr").impl(recipe, build_encoder(encoder_cfg, data.channels)), device)
    bare_training(reference, images, labels, batch, 2, recipe.lr, device, dtype)  # warm-up
    before = bare_training(reference, images, labels, batch, steps, recipe.lr, device, dtype)
    sslfuse(workdir, "pretrain", "pretext=simclr", *common, "hydra.run.dir=pretrain")
    after = bare_training(reference, images, labels, batch, steps, recipe.lr, device, dtype)
    rows.append(
        row(
            f"pretrain simclr (resnet18, batch {batch})",
            manifest(workdir, "encoders", "simclr")["timings"]["images_per_second"],
            max(before, after),
        )
    )
    del reference

    # cache the ResNet-18's features, against model(x) over the same images in memory
    encoder = prepare_model(build_encoder(encoder_cfg, data.channels), device)
    every = torch.cat([data.train_images, data.test_images])
    before = bare_inference(encoder, every, 1024, device, dtype)
    sslfuse(workdir, "cache", "pretexts=[simclr]", *common, "cache.batch_size=1024", "hydra.run.dir=cache")
    after = bare_inference(encoder, every, 1024, device, dtype)
    rows.append(
        row(
            "cache simclr (resnet18, batch 1024)",
            manifest(workdir, "features", "simclr")["timings"]["images_per_second"],
            max(before, after),
        )
    )
    del encoder

    # (b) cache an external torchvision ResNet-50 at 224 px, against model(x) over images converted up front
    torch.manual_seed(0)
    resnet50 = torchvision.models.resnet50()
    torch.save(resnet50.state_dict(), workdir / "r50.pth")
    resnet50.fc = torch.nn.Identity()
    subset = every[: sizes["external_bare_images"]]
    batch = sizes["external_batch"]
    before = bare_images_per_second(resnet50, subset, sizes["size"], batch, device, dtype)
    ours = cached_images_per_second(
        workdir,
        workdir / "r50.pth",
        sizes["train"],
        sizes["test"],
        sizes["size"],
        [*common, f"cache.batch_size={batch}"],
    )
    after = bare_images_per_second(resnet50, subset, sizes["size"], batch, device, dtype)
    rows.append(row(f"cache external resnet50 at {sizes['size']} px (batch {batch})", ours, max(before, after)))
    del resnet50

    # (c) fuse both
    fuse_started = time.perf_counter()
    sslfuse(
        workdir,
        "fuse",
        "pretexts=[simclr,r50]",
        "fusion=concat",
        f"labels.per_class={sizes['per_class']}",
        *common,
        *external_overrides(workdir / "r50.pth", sizes["size"]),
        "hydra.run.dir=fuse",
    )
    fuse_seconds = time.perf_counter() - fuse_started
    fused = json.loads((workdir / "fuse/results.json").read_text())
    syncs = host_syncs_per_step(data, encoder_cfg, device, dtype)

    precision = str(dtype).removeprefix("torch.")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"sslfuse GPU check on {name} ({device}, precision {precision}; dataset {node['name']}, "
        f"{len(data.train_labels)} train + {len(data.test_labels)} test images; {time.perf_counter() - started:.0f} "
        "s in all)",
        "",
        "| stage | sslfuse img/s | bare loop img/s | ratio |",
        "|---|--:|--:|--:|",
    ]
    lines += [f"| {r['stage']} | {r['sslfuse_img_s']:.1f} | {r['bare_img_s']:.1f} | {r['ratio']:.2f} |" for r in rows]
    lines += [
        "",
        f"fuse {fused['method']} at {fused['regime']} labels: {fuse_seconds:.1f} s for the command, "
        f"test accuracy {100 * fused['test_accuracy']:.2f}% (heads read cached features: no bare image loop)",
        "",
        "host syncs per training step: "
        + (", ".join(f"{name} {count:g}" for name, count in syncs.items()) or "counted on CUDA only"),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(
        json.dumps(
            {
                "device": name,
                "precision": precision,
                "dataset": node,
                "rows": rows,
                "fuse": {"seconds": fuse_seconds, **{k: fused[k] for k in ("method", "regime", "test_accuracy")}},
                "host_syncs_per_step": syncs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(SIZES), default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (torch.cuda.is_available() is False)")
    check(args.device, Path(args.out))


if __name__ == "__main__":
    main()
