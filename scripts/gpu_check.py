#!/usr/bin/env python
"""The CUDA check (run by scripts/gpu_check.sh): one rotation epoch of a ResNet-18 in bf16, caching its features and
those of an external torchvision ResNet-50 at 224 px (random weights saved to a local checkpoint), a fuse of both,
each through the `sslfuse` command in a fresh store; then each stage's images/s against a plain PyTorch loop on the
same model, batch and precision, measured in the same run (before and after sslfuse's pass; the faster counts).
Then the host syncs per training step of each pretext, counted by torch's sync debug mode.
Prints one Markdown table and writes it (and JSON) to --out.

The plain loops are what a user would write: the training one is its own forward, cross-entropy, backward and
optimiser step over the whole training set held on the GPU (the rotation recipe written out, not sslfuse's pretext),
so the ratio shows sslfuse's overheads. Every timed region is closed by ``torch.cuda.synchronize`` (CUDA runs
kernels asynchronously: an unsynchronised timer measures their launches), the loops keep their outputs (a checksum
of every loss and feature), and they warm up on full batches first. Host syncs per step are counted with torch's
sync debug mode, as the difference between 2n and n steps (what a run does once cancels out); peak memory is
``torch.cuda.max_memory_allocated`` of the loop, or of the whole `sslfuse` command.

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
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # external_throughput.py beside this file

from external_throughput import external_overrides  # noqa: E402

from ssl_fusion.config import TrainOverrides, load_option  # noqa: E402
from ssl_fusion.data.datasets import ImageData, load_dataset  # noqa: E402
from ssl_fusion.models.encoders import ENCODERS, EncoderConfig, build_encoder  # noqa: E402
from ssl_fusion.models.external import ExternalEncoder, ExternalEncoderConfig  # noqa: E402
from ssl_fusion.pretexts import PRETEXTS  # noqa: E402
from ssl_fusion.pretexts.trainer import train_pretext  # noqa: E402
from ssl_fusion.runtime.device import (  # noqa: E402
    prepare_model,
    resolve_device,
    resolve_precision,
)
from ssl_fusion.runtime.errors import UserError  # noqa: E402
from ssl_fusion.store.artifacts import pretext_recipe  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PRETEXT = "rotation"  # the pretext the check pretrains: its recipe is a few lines of plain PyTorch
SYNC_WARNING = "called a synchronizing CUDA operation"  # what torch's sync debug mode warns at each host sync
PEAK = "gpu_check: peak bytes"  # the line the wrapped `sslfuse` command ends with on stderr
SIZES = {
    # GPU: the whole of Fashion-MNIST (or 20,000 synthetic images), one full rotation epoch, ResNet-50 at 224 px
    "cuda": {
        "train": 60000,
        "test": 10000,
        "synthetic": {"n_train": 20000, "n_test": 4000},
        "precision": "bf16",
        "train_overrides": {},
        "warmup_steps": 5,
        "bare_steps": 40,
        "sync_steps": 20,
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
        "train_overrides": {"batch_size": 16, "max_steps_per_epoch": 2},
        "warmup_steps": 1,
        "bare_steps": 2,
        "sync_steps": 1,
        "size": 32,
        "external_batch": 32,
        "external_bare_images": 64,
        "per_class": 10,
    },
}

# `python -m ssl_fusion.cli <args>` that reports, when it ends, the peak of the GPU memory its tensors took
CLI_WITH_PEAK = "\n".join(
    [
        "import atexit, runpy, sys, torch",
        "def peak():",
        "    if torch.cuda.is_initialized():",
        f"        print('{PEAK}', torch.cuda.max_memory_allocated(), file=sys.stderr)",
        "atexit.register(peak)",
        "runpy.run_module('ssl_fusion.cli', run_name='__main__', alter_sys=True)",
    ]
)


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device``; the CPU's work is done when its call returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds of a block, the device's work in it included: synchronised when it starts and when it ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.started


class SyncCount:
    """The host syncs in a block on CUDA (``count``; None on the CPU, which has none to count): torch's sync debug
    mode warns at each one, and the warnings are caught and counted."""

    def __init__(self, device: torch.device) -> None:
        self.enabled, self.count = device.type == "cuda", None

    def __enter__(self) -> SyncCount:
        if self.enabled:
            self.catching = warnings.catch_warnings(record=True)
            self.caught = self.catching.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
            self.catching.__exit__(*exc)
            self.count = sum(SYNC_WARNING in str(warning.message) for warning in self.caught)


def syncs_per_step(run: Callable[[int], None], steps: int, device: torch.device) -> Optional[float]:
    """Host syncs of one step of ``run(n)`` (n steps): those of 2 ``steps`` less those of ``steps``, over ``steps``,
    so that what a run does once (setting up, a checkpoint at the end) cancels out. None on the CPU."""
    counts = []
    for n in (steps, 2 * steps):
        with SyncCount(device) as syncs:
            run(n)
        counts.append(syncs.count)
    return None if counts[0] is None else (counts[1] - counts[0]) / steps


def peak_bytes(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class PlainRotation(nn.Module):
    """The rotation recipe as a user would write it: the encoder and a two-layer head, one sslfuse does not wrap."""

    def __init__(self, encoder: nn.Module, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(encoder.out_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4))

    def loss(self, images: torch.Tensor, max_shift: float) -> torch.Tensor:
        """Cross-entropy of the quarter turns of every image (floats in [0, 1]), shifted and mirrored first."""
        n, device = images.shape[0], images.device
        mirror = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
        shift = (torch.rand(n, 2, device=device) * 2 - 1) * (2 * max_shift)  # affine_grid's [-1, 1] spans the size
        zero, one = torch.zeros(n, device=device), torch.ones(n, device=device)
        theta = torch.stack([torch.stack([mirror, zero, shift[:, 0]], 1), torch.stack([zero, one, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        x = F.grid_sample(images, grid, align_corners=False)
        rotated = torch.cat([x.rot90(k, (2, 3)) for k in range(4)]).contiguous(memory_format=torch.channels_last)
        turns = torch.arange(4, device=device).repeat_interleave(n)
        return F.cross_entropy(self.head(self.encoder(rotated)).float(), turns)


def plain_training(
    images: torch.Tensor, encoder_cfg: EncoderConfig, recipe, sizes: dict, device: torch.device, dtype: torch.dtype
) -> dict:
    """images/s of a plain training loop (``PlainRotation``, AdamW) over ``images`` (uint8) held on the
    device, after full-batch warm-up steps; its host syncs per step, peak memory, and the checksum of its losses."""
    batch = min(recipe.batch_size, len(images))
    torch.manual_seed(0)
    model = PlainRotation(build_encoder(encoder_cfg, images.shape[1]), recipe.head_hidden)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    on_device = images.to(device)
    batches = torch.randperm(len(images), device=device)[: len(images) // batch * batch].view(-1, batch)
    checksum = torch.zeros((), device=device)

    def run(steps: int) -> None:
        nonlocal checksum
        for step in range(steps):
            x = on_device[batches[step % len(batches)]].float().div_(255)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model.loss(x, recipe.max_shift)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            checksum += loss.detach()

    run(sizes["warmup_steps"])
    reset_peak(device)
    with Stopwatch(device) as timer:
        run(sizes["bare_steps"])
    measured = {
        "images_per_second": sizes["bare_steps"] * batch / timer.seconds,
        "peak_bytes": peak_bytes(device),
    }
    measured["syncs_per_step"] = syncs_per_step(run, sizes["sync_steps"], device)
    return {**measured, "checksum": float(checksum)}


def sslfuse_syncs_per_step(
    name: str, data: ImageData, encoder_cfg: EncoderConfig, recipe, steps: int, device, dtype, workdir: Path
) -> Optional[float]:
    """Host syncs per step of sslfuse's pretraining loop and pretext ``name`` (``train_pretext``), run in this
    process."""

    def run(n: int) -> None:
        torch.manual_seed(0)
        encoder = build_encoder(encoder_cfg, data.channels)
        model = prepare_model(PRETEXTS.get(name).impl(recipe, encoder), device)
        checkpoint = workdir / f"syncs-{name}-{n}" / "last.pt"  # a fresh one: not resumed
        train_pretext(model, data.train_images, data.train_labels, recipe, device, dtype, 0, checkpoint, n)

    return syncs_per_step(run, steps, device)


def plain_inference(model: nn.Module, batches: list[torch.Tensor], device, dtype) -> dict:
    """images/s of model(x) over input batches already on the device, after a full-batch warm-up; its peak memory
    and the checksum of its features."""
    model.eval()
    checksum = torch.zeros((), device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        model(batches[0])
        reset_peak(device)
        with Stopwatch(device) as timer:
            for batch in batches:
                checksum += model(batch).float().sum()
    images = sum(len(batch) for batch in batches)
    return {
        "images_per_second": images / timer.seconds,
        "peak_bytes": peak_bytes(device),
        "syncs_per_step": None,
        "checksum": float(checksum),
    }


def faster(before: dict, after: dict) -> dict:
    """The faster of the reference's two passes (before and after sslfuse's): drifting load cannot favour sslfuse."""
    return max(before, after, key=lambda measured: measured["images_per_second"])


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


def sslfuse(workdir: Path, *args: str) -> Optional[int]:
    """`sslfuse <args>` in ``workdir`` (its store under outputs/artifacts there); its output shown if it fails.
    Returns the peak of the GPU memory its tensors took (None when it used no GPU)."""
    proc = subprocess.run([sys.executable, "-c", CLI_WITH_PEAK, *args], cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"sslfuse {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    peaks = [line.split()[-1] for line in proc.stderr.splitlines() if line.startswith(PEAK)]
    return int(peaks[-1]) if peaks else None


def manifest(workdir: Path, kind: str, prefix: str) -> dict:
    (path,) = (workdir / "outputs/artifacts" / kind).glob(f"{prefix}-*/manifest.json")
    return json.loads(path.read_text())


def row(stage: str, batch: int, ours: dict, bare: dict) -> dict:
    """One stage's figures: sslfuse's (``ours``: images/s, peak bytes, syncs per step) and the plain loop's; steps
    of ``batch`` images a second for both."""

    def rounded(value: Optional[float], digits: int = 1) -> Optional[float]:
        return None if value is None else round(value, digits)

    return {
        "stage": stage,
        "sslfuse_img_s": round(ours["images_per_second"], 2),
        "bare_img_s": round(bare["images_per_second"], 2),
        "ratio": round(ours["images_per_second"] / bare["images_per_second"], 3),
        "sslfuse_steps_s": round(ours["images_per_second"] / batch, 2),
        "bare_steps_s": round(bare["images_per_second"] / batch, 2),
        "sslfuse_syncs_per_step": rounded(ours.get("syncs_per_step"), 2),
        "bare_syncs_per_step": rounded(bare["syncs_per_step"], 2),
        "sslfuse_peak_gib": rounded(ours["peak_bytes"] and ours["peak_bytes"] / 2**30, 2),
        "bare_peak_gib": rounded(bare["peak_bytes"] and bare["peak_bytes"] / 2**30, 2),
        "bare_checksum": bare["checksum"],
    }


def host_syncs_per_step(
    data, encoder_cfg, sizes: dict, device: torch.device, dtype: torch.dtype, workdir: Path
) -> dict:
    """Host syncs per step of sslfuse's pretraining of each pretext that trains on ``data`` (its default recipe), a
    ResNet-18 each, over one epoch, counted as ``sslfuse_syncs_per_step`` counts them; empty off CUDA."""
    if device.type != "cuda":
        return {}
    counts = {}
    for name in PRETEXTS.names():
        pretext_cls = PRETEXTS.get(name).impl
        if not pretext_cls.trains:
            continue
        recipe = pretext_cls.adapt(pretext_recipe(name, TrainOverrides(epochs=1)), data)
        try:
            pretext_cls.check(recipe, data)
        except UserError:  # e.g. colorization on grayscale images
            continue
        counts[name] = sslfuse_syncs_per_step(
            name, data, encoder_cfg, recipe, sizes["sync_steps"], device, dtype, workdir
        )
    return counts


def table_line(r: dict) -> str:
    def shown(value) -> str:
        return "–" if value is None else f"{value:g}"

    return (
        f"| {r['stage']} | {r['sslfuse_img_s']:.1f} | {r['bare_img_s']:.1f} | {r['ratio']:.2f} "
        f"| {r['sslfuse_steps_s']:g} / {r['bare_steps_s']:g} "
        f"| {shown(r['sslfuse_syncs_per_step'])} / {shown(r['bare_syncs_per_step'])} "
        f"| {shown(r['sslfuse_peak_gib'])} / {shown(r['bare_peak_gib'])} |"
    )


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
    recipe = pretext_recipe(PRETEXT, TrainOverrides(**sizes["train_overrides"]))
    rows, started = [], time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="sslfuse-gpu-check-"))

    # (a) one rotation epoch of a ResNet-18, against a plain loop of the same model, recipe and batch
    images = data.train_images
    batch = min(recipe.batch_size, len(images))
    before = plain_training(images, encoder_cfg, recipe, sizes, device, dtype)
    peak = sslfuse(workdir, "pretrain", f"pretext={PRETEXT}", *common, "hydra.run.dir=pretrain")
    after = plain_training(images, encoder_cfg, recipe, sizes, device, dtype)
    ours = {
        "images_per_second": manifest(workdir, "encoders", PRETEXT)["timings"]["images_per_second"],
        "peak_bytes": peak,
        "syncs_per_step": sslfuse_syncs_per_step(
            PRETEXT, data, encoder_cfg, recipe, sizes["sync_steps"], device, dtype, workdir
        ),
    }
    rows.append(row(f"pretrain {PRETEXT} (resnet18, batch {batch})", batch, ours, faster(before, after)))

    # cache the ResNet-18's features, against model(x) over the same images on the device
    encoder = prepare_model(build_encoder(encoder_cfg, data.channels), device)
    every = torch.cat([data.train_images, data.test_images])
    batches = [
        (every[i : i + 1024].float() / 255).contiguous(memory_format=torch.channels_last).to(device)
        for i in range(0, len(every), 1024)
    ]
    before = plain_inference(encoder, batches, device, dtype)
    peak = sslfuse(workdir, "cache", f"pretexts=[{PRETEXT}]", *common, "cache.batch_size=1024", "hydra.run.dir=cache")
    after = plain_inference(encoder, batches, device, dtype)
    ours = {"images_per_second": manifest(workdir, "features", PRETEXT)["timings"]["images_per_second"]}
    rows.append(
        row(f"cache {PRETEXT} (resnet18, batch 1024)", 1024, {**ours, "peak_bytes": peak}, faster(before, after))
    )
    del encoder, batches

    # (b) cache an external torchvision ResNet-50 at 224 px, against model(x) over images converted up front
    torch.manual_seed(0)
    resnet50 = torchvision.models.resnet50()
    torch.save(resnet50.state_dict(), workdir / "r50.pth")
    resnet50.fc = nn.Identity()
    resnet50 = resnet50.to(device, memory_format=torch.channels_last)
    size, batch = sizes["size"], sizes["external_batch"]
    convert = ExternalEncoder(nn.Identity(), 0, ExternalEncoderConfig(arch="", image_size=size))
    subset = every[: sizes["external_bare_images"]]
    batches = [
        convert(subset[i : i + batch].float() / 255).contiguous(memory_format=torch.channels_last).to(device)
        for i in range(0, len(subset), batch)
    ]
    before = plain_inference(resnet50, batches, device, dtype)
    peak = sslfuse(
        workdir,
        "cache",
        "pretexts=[r50]",
        *external_overrides(workdir / "r50.pth", size),
        *common,
        f"cache.batch_size={batch}",
        "hydra.run.dir=cache_r50",
    )
    after = plain_inference(resnet50, batches, device, dtype)
    ours = {"images_per_second": manifest(workdir, "features", "r50")["timings"]["images_per_second"]}
    rows.append(
        row(
            f"cache external resnet50 at {size} px (batch {batch})",
            batch,
            {**ours, "peak_bytes": peak},
            faster(before, after),
        )
    )
    del resnet50, batches

    # (c) fuse both
    fuse_started = time.perf_counter()
    sslfuse(
        workdir,
        "fuse",
        f"pretexts=[{PRETEXT},r50]",
        "fusion=concat",
        f"labels.per_class={sizes['per_class']}",
        *common,
        *external_overrides(workdir / "r50.pth", size),
        "hydra.run.dir=fuse",
    )
    fuse_seconds = time.perf_counter() - fuse_started
    fused = json.loads((workdir / "fuse/results.json").read_text())
    syncs = host_syncs_per_step(data, encoder_cfg, sizes, device, dtype, workdir)

    precision = str(dtype).removeprefix("torch.")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"sslfuse GPU check on {name} ({device}, precision {precision}; dataset {node['name']}, "
        f"{len(data.train_labels)} train + {len(data.test_labels)} test images; {time.perf_counter() - started:.0f} "
        "s in all)",
        "",
        "| stage | sslfuse img/s | plain loop img/s | ratio | steps/s (sslfuse / plain) "
        "| host syncs per step (sslfuse / plain) | peak GiB (sslfuse command / plain) |",
        "|---|--:|--:|--:|--:|--:|--:|",
        *(table_line(r) for r in rows),
        "",
        f"fuse {fused['method']} at {fused['regime']} labels: {fuse_seconds:.1f} s for the command, "
        f"test accuracy {100 * fused['test_accuracy']:.2f}% (heads read cached features: no plain image loop)",
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
