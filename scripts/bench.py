#!/usr/bin/env python
"""Benchmark each stage against a reference measured in the same run on the same work: pretraining and caching
against a bare PyTorch loop on the same model, batch and precision; the head protocol against scikit-learn's
LogisticRegressionCV on the same features and labeled subsets; the sweep against its target pace. Prints one
table and writes it as JSON (rows: stage, ours, reference, ratio, target, meets).

    .venv/bin/python scripts/bench.py                  # Fashion-MNIST, the default run's encoders
    .venv/bin/python scripts/bench.py --only heads     # the head-protocol rows alone
    .venv/bin/python scripts/bench.py --preset smoke   # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits

from ssl_fusion.cli import JOBLIB, installed
from ssl_fusion.config import LabelsConfig, ProbeConfig, TrainOverrides, load_option
from ssl_fusion.data.datasets import load_dataset
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.data.splits import stratified_subset
from ssl_fusion.evaluation.reference import concat_logistic_regression_cv
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.protocol import fuse_once, head_threads
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.pretexts.trainer import train_pretext
from ssl_fusion.runtime.device import (
    autocast,
    prepare_model,
    resolve_device,
    resolve_precision,
)
from ssl_fusion.stages.caching import ensure_features
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.pretrain import ensure_encoder
from ssl_fusion.store.artifacts import ENCODERS_KIND, load_features, pretext_recipe
from ssl_fusion.store.files import ArtifactStore

PRESETS = {
    "default": {
        "dataset": {"name": "fashion_mnist"},
        "pretrain_steps": 60,
        "head_seeds": [0, 1, 2],
        "head_fraction": 0.01,
        "sweep_seeds": "0,1,2",
    },
    "smoke": {
        "dataset": {"name": "synthetic", "n_train": 1024, "n_test": 512},
        "pretrain_steps": 4,
        "head_seeds": [0],
        "head_fraction": 0.1,
        "sweep_seeds": "0",
    },
}


def row(stage: str, ours: float, reference: float, unit: str, target: float, higher_is_better: bool = True) -> dict:
    ratio = ours / reference if higher_is_better else reference / ours
    return {
        "stage": stage,
        "ours": round(ours, 2),
        "reference": round(reference, 2),
        "unit": unit,
        "ratio": round(ratio, 3),
        "target": target,
        "meets": bool(ratio >= target),
    }


def bare_inference(encoder, images: torch.Tensor, batch_size: int, device, dtype) -> float:
    """images/s of model(x) over float tensors already in memory (the cache stage's ceiling), after one warm-up
    batch."""
    batches = [
        (images[i : i + batch_size].float() / 255).contiguous(memory_format=torch.channels_last).to(device)
        for i in range(0, len(images), batch_size)
    ]
    encoder.eval()
    with torch.inference_mode(), autocast(device, dtype):
        encoder(batches[0])
        started = time.perf_counter()
        for batch in batches:
            encoder(batch)
    return len(images) / (time.perf_counter() - started)


def bench_cache(ctx: StageContext, encoder_name: str, batch_size: int, workdir: Path) -> dict:
    """The cache stage computing features afresh (in a scratch store) vs. model(x) over tensors in memory; the
    reference is timed before and after ours and the faster pass counts, so drifting machine load cannot favour us."""
    scratch = ArtifactStore(workdir / "store")
    shutil.copytree(ctx.store.folder(ENCODERS_KIND, encoder_name), scratch.folder(ENCODERS_KIND, encoder_name))
    encoder = prepare_model(build_encoder(SmallCNNConfig(name="small_cnn"), ctx.data.channels), ctx.device)
    images = torch.cat([ctx.data.train_images, ctx.data.test_images])
    before = bare_inference(encoder, images, batch_size, ctx.device, ctx.dtype)
    _, manifest, _ = ensure_features(dataclasses.replace(ctx, store=scratch), encoder_name, batch_size)
    after = bare_inference(encoder, images, batch_size, ctx.device, ctx.dtype)
    return row("cache", manifest["timings"]["images_per_second"], max(before, after), "img/s", 0.9)


def bare_training(
    model, images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int, lr: float, device, dtype
) -> float:
    """images/s of forward + backward + step over the pretext's loss on tensors in memory."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        index = slice(step * batch_size, (step + 1) * batch_size)
        with autocast(device, dtype):
            loss = model.loss(images[index].to(device).float().div_(255), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - started)


def bench_pretrain(ctx: StageContext, pretext: str, steps: int, workdir: Path) -> dict:
    """A pretrain epoch capped at ``steps`` vs. the bare loop on the same model, timed before and after ours
    (the faster pass counts)."""
    recipe = pretext_recipe(pretext, TrainOverrides(epochs=1))
    pretext_cls = PRETEXTS.get(pretext).impl
    images, labels = ctx.data.train_images, ctx.data.train_labels
    batch = min(recipe.batch_size, len(images))
    steps = min(steps, len(images) // batch)
    torch.manual_seed(0)
    reference_model = prepare_model(
        pretext_cls(recipe, build_encoder(SmallCNNConfig(name="small_cnn"), ctx.data.channels)), ctx.device
    )
    bare_training(reference_model, images, labels, batch, 2, recipe.lr, ctx.device, ctx.dtype)  # warm-up
    before = bare_training(reference_model, images, labels, batch, steps, recipe.lr, ctx.device, ctx.dtype)
    torch.manual_seed(0)
    model = prepare_model(
        pretext_cls(recipe, build_encoder(SmallCNNConfig(name="small_cnn"), ctx.data.channels)), ctx.device
    )
    result = train_pretext(
        model, images, labels, recipe, ctx.device, ctx.dtype, 0, workdir / f"{pretext}.pt", max_steps_per_epoch=steps
    )
    after = bare_training(reference_model, images, labels, batch, steps, recipe.lr, ctx.device, ctx.dtype)
    return row(f"pretrain {pretext}", result.images_per_second, max(before, after), "img/s", 0.9)


def bench_head_protocol(features: dict[str, FeatureSet], seeds: list[int], fraction: float = 0.01) -> list[dict]:
    """Our head protocol (k-fold selection, refit, restarts) for ``single`` on each pretext and ``concat`` on the
    pretexts its screen keeps, against ``LogisticRegressionCV(cv=5)`` on the same standardised features of the same
    labeled subsets, at ``fraction`` labels and each of ``seeds``. Two rows per head: mean test accuracy in percent
    (ratio: ours / reference) and the summed wall time (ratio: reference / ours), both on one thread."""
    cases = [(dataclasses.replace(load_option(FUSIONS, "single"), pretext=p), {p: features[p]}) for p in features]
    cases.append((load_option(FUSIONS, "concat"), features))
    totals: dict[str, dict[str, float]] = {}
    for fusion, sets in cases:
        total = totals.setdefault(
            fusion.name, {"ours": 0.0, "reference": 0.0, "ours_s": 0.0, "reference_s": 0.0, "n": 0}
        )
        for seed in seeds:
            started = time.perf_counter()
            with head_threads(1):
                result = fuse_once(sets, fusion, LabelsConfig(fraction=fraction), seed)
            total["ours_s"] += time.perf_counter() - started
            kept = [fs for name, fs in sets.items() if name not in result.get("screened_out", [])]
            labeled = stratified_subset(kept[0].train_labels, fraction, None, seed)
            started = time.perf_counter()
            with threadpool_limits(1):
                accuracy = concat_logistic_regression_cv(kept, labeled).accuracy(kept[0].test_labels)
            total["reference_s"] += time.perf_counter() - started
            total["ours"] += result["test_accuracy"]
            total["reference"] += accuracy
            total["n"] += 1
    rows = []
    for name, total in totals.items():
        rows.append(
            row(
                f"{name} accuracy vs LogisticRegressionCV ({total['n']} fits)",
                100 * total["ours"] / total["n"],
                100 * total["reference"] / total["n"],
                "% test accuracy",
                1.0,
            )
        )
        rows.append(
            row(
                f"{name} time vs LogisticRegressionCV ({total['n']} fits)",
                total["ours_s"],
                total["reference_s"],
                "s",
                1.0,
                higher_is_better=False,
            )
        )
    return rows


SWEEP_LIMIT_PER_RUN = 180.0 / 48  # the target: a 48-run sweep within 3 minutes
ENCODER_RAN = re.compile(
    r"pretraining encoder|cached features \S+: \d+ images"
)  # what pretrain / cache log when they compute


def sweep_launcher() -> list[str]:
    """Jobs two at a time (one per core, heads train on one thread each) where the joblib launcher plugin is
    installed; else Hydra's basic launcher, one job after another."""
    if not installed(JOBLIB):  # False, not ModuleNotFoundError, when the hydra_plugins package itself is missing
        return []
    return ["hydra/launcher=local", f"hydra.launcher.n_jobs={os.cpu_count()}"]


def bench_sweep(workdir: Path, artifacts: Path, dataset_overrides: list[str], seeds: str, launcher: list[str]) -> dict:
    """Wall time of the fuse multirun a user runs (4 methods × 2 label regimes × seeds × 2 pretext sets; 48 runs with
    three seeds) on cached features, against the target pace of 180 s per 48 runs. Fails if a run is missing or if
    any encoder ran (pretraining or feature caching) during the sweep."""
    sweep_dir = workdir / "sweep"
    command = [
        sys.executable,
        "-m",
        "ssl_fusion.cli",
        "fuse",
        "-m",
        *launcher,
        f"artifacts_dir={artifacts}",
        *dataset_overrides,
        "fusion=attention,concat,mean,select",
        "labels.fraction=0.01,0.1",
        f"seed={seeds}",
        "pretexts=[rotation,simclr],[rotation,simclr,random]",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr + "".join(path.read_text() for path in sweep_dir.rglob("*.log"))
    runs = len(list(sweep_dir.rglob("results.json")))
    expected = 4 * 2 * len(seeds.split(",")) * 2
    if proc.returncode != 0 or runs != expected or ENCODER_RAN.search(log):
        raise SystemExit(
            f"sweep failed ({runs} of {expected} runs) or ran an encoder:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    jobs = launcher[-1].partition("=")[2] + " at a time" if launcher else "one at a time"
    return row(
        f"sweep ({runs} runs, {jobs})",
        seconds,
        SWEEP_LIMIT_PER_RUN * runs,
        "s (reference: limit)",
        1.0,
        higher_is_better=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument(
        "--only",
        choices=["all", "heads", "cache"],
        default="all",
        help="heads: the head-protocol rows alone; cache: the cache row alone",
    )
    parser.add_argument(
        "--artifacts-dir", default="outputs/artifacts", help="the store holding (or receiving) the encoders and caches"
    )
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = resolve_device("auto")
    dtype = resolve_precision("auto", device)
    dataset_cfg, data = load_dataset(preset["dataset"], None)
    store = ArtifactStore(args.artifacts_dir)
    ctx = StageContext(dataset_cfg, data, SmallCNNConfig(name="small_cnn"), device, dtype, store, TrainOverrides(), 0)
    workdir = Path(tempfile.mkdtemp(prefix="sslfuse-bench-"))
    every = args.only == "all"
    if args.only == "cache":
        encoder_name, _, _ = ensure_encoder(
            ctx, pretext_recipe("random", TrainOverrides(epochs=1)), ProbeConfig(max_train=2000, max_test=500)
        )
        print_rows([bench_cache(ctx, encoder_name, 1024, workdir)], args, device, dtype)
        shutil.rmtree(workdir, ignore_errors=True)
        return
    rows = [bench_pretrain(ctx, p, preset["pretrain_steps"], workdir) for p in ("rotation", "simclr")] if every else []
    feature_names = {}
    for pretext in ("rotation", "simclr", "random"):
        encoder_name, _, _ = ensure_encoder(
            ctx, pretext_recipe(pretext, TrainOverrides(epochs=1)), ProbeConfig(max_train=2000, max_test=500)
        )
        if pretext == "random" and every:
            rows.insert(0, bench_cache(ctx, encoder_name, 1024, workdir))
        feature_names[pretext] = ensure_features(ctx, encoder_name, 1024)[0]
    features = {p: load_features(store, n) for p, n in feature_names.items()}
    rows += bench_head_protocol(features, preset["head_seeds"], preset["head_fraction"])
    if every:
        dataset_overrides = [f"dataset={dataset_cfg.name}", "train.epochs=1"] + (
            ["dataset.n_train=1024", "dataset.n_test=512"] if args.preset == "smoke" else []
        )
        rows.append(
            bench_sweep(workdir, store.root.resolve(), dataset_overrides, preset["sweep_seeds"], sweep_launcher())
        )
    print_rows(rows, args, device, dtype)
    shutil.rmtree(workdir, ignore_errors=True)


def print_rows(rows: list[dict], args: argparse.Namespace, device, dtype) -> None:
    """The table on the terminal and as JSON in ``--out``."""
    table = Table(
        title=f"sslfuse benchmark ({args.preset}; device {device}, precision {str(dtype).removeprefix('torch.')})"
    )
    for column in ("stage", "ours", "reference", "unit", "ratio", "target", "meets"):
        table.add_column(column)
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("stage", "ours", "reference", "unit", "ratio", "target", "meets")))
    Console().print(table)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
