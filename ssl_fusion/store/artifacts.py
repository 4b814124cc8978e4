"""The hand-off contract between stages: how encoder and feature artifacts are named, keyed and read.

Stages only meet here: pretraining publishes ``encoders/<pretext>-<key>``, caching reads it and
publishes ``features/<pretext>-<key>``, fusion reads that. Each key hashes everything that
determines the artifact (recipe, encoder, data content, seed, the device kind and precision that computed it) and
the source files of the code that makes it, so an edit of that code (a pretext's module, the trainer, the encoder,
the cache stage...) makes a new artifact instead of reusing one made by the old code, and a store shared by GPU and
CPU machines keeps a bf16 GPU encoder apart from an fp32 CPU one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np
import torch

from ssl_fusion.config import TrainOverrides, as_plain, load_option
from ssl_fusion.data.datasets import DATASETS, DatasetConfig, ImageData
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.models.encoders import ENCODERS, Encoder, EncoderConfig, build_encoder
from ssl_fusion.models.external import (
    ExternalEncoderConfig,
    pretrained_source,
    resolve_input,
    weights_source,
)
from ssl_fusion.pretexts import PRETEXTS, PretextConfig
from ssl_fusion.runtime import distributed
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.store.files import MANIFEST, ArtifactStore, content_key


class StageData(Protocol):
    """What an artifact's name reads of the stage's context (``ssl_fusion.stages.context.StageContext``), which the
    stages hand in: the store imports nothing of theirs."""

    dataset_cfg: DatasetConfig
    encoder_cfg: EncoderConfig
    device: torch.device
    dtype: torch.dtype
    seed: int
    store: ArtifactStore
    overrides: TrainOverrides

    @property
    def fingerprints(self) -> dict[str, str]: ...

    @property
    def pretraining(self) -> ImageData: ...

    def for_pretraining(self) -> StageData: ...


ENCODERS_KIND = "encoders"
FEATURES_KIND = "features"
VIEWS_KIND = "views"
SPLITS = ("train", "test")

PACKAGE = Path(__file__).resolve().parents[1]
# What makes every encoder, besides its pretext's and its pretraining dataset's own modules (files, or folders of .py
# files, in the package).
PRETRAIN_CODE = (
    "pretexts/__init__.py",
    "pretexts/trainer.py",
    "stages/pretrain.py",
    "models/encoders.py",
    "models/decoders.py",
    "data/augment.py",
    "data/batches.py",
    "data/datasets/__init__.py",
    "runtime/device.py",
    "runtime/distributed.py",
)
CACHE_STAGE = "ssl_fusion.stages.caching"
# The modules the cache stage uses whose code is not in a cached artifact's key through ``cache_sources``: either it
# does not shape the values written (configuration, registries, errors, progress bars, the store's files and the
# stage's setup) or another part of the key holds it (pretexts and datasets: the encoder's key, ``dataset_modules``).
NOT_CACHE_CODE = (
    "ssl_fusion.config",
    "ssl_fusion.runtime.registry",
    "ssl_fusion.runtime.errors",
    "ssl_fusion.runtime.progress",
    "ssl_fusion.store.files",
    "ssl_fusion.stages",
    "ssl_fusion.stages.context",
    "ssl_fusion.data.features",
    "ssl_fusion.data.imported",
    "ssl_fusion.pretexts.",
    "ssl_fusion.data.datasets.",
)


def package_files(names: tuple[str, ...]) -> tuple[Path, ...]:
    files: list[Path] = []
    for name in names:
        path = PACKAGE / name
        files.extend(sorted(path.glob("*.py")) if path.is_dir() else [path])
    return tuple(files)


def modules_used(start: ModuleType, package: str, leave_out: tuple[str, ...] = ()) -> list[ModuleType]:
    """``start`` and the modules of ``package`` it uses, directly or not (e.g. vicreg's two views come from
    simclr; Fashion-MNIST's loader comes from the torchvision datasets). Modules named in ``leave_out``, or under a
    package named there with a final dot, are neither listed nor followed."""
    found: dict[str, ModuleType] = {}
    pending = [start]
    while pending:
        module = pending.pop()
        if (
            module.__name__ in found
            or module.__name__ in leave_out
            or module.__name__.startswith(tuple(name for name in leave_out if name.endswith(".")))
        ):
            continue
        found[module.__name__] = module
        for value in vars(module).values():
            used = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
            if isinstance(used, str) and used.startswith(package) and used in sys.modules:
                pending.append(sys.modules[used])
    return [found[key] for key in sorted(found)]


def pretext_modules(name: str) -> list[ModuleType]:
    """The module of pretext ``name`` and the other pretext modules it uses."""
    return modules_used(sys.modules[PRETEXTS.get(name).impl.__module__], "ssl_fusion.pretexts.")


def dataset_modules(name: str) -> list[ModuleType]:
    """The module that loads dataset ``name`` and the dataset modules it uses: an encoder pretrained on
    Fashion-MNIST does not depend on the code that reads an image folder."""
    return modules_used(sys.modules[DATASETS.get(name).impl.__module__], "ssl_fusion.data.datasets.")


def pretrain_sources(pretext: str, dataset: str) -> tuple[Path, ...]:
    """The source files whose code makes an encoder of ``pretext`` pretrained on ``dataset``."""
    own = [Path(module.__file__).resolve() for module in [*pretext_modules(pretext), *dataset_modules(dataset)]]
    return tuple(dict.fromkeys([*own, *package_files(PRETRAIN_CODE)]))


def cache_sources(dataset: str) -> tuple[Path, ...]:
    """The source files whose code turns an encoder into cached features or views of ``dataset``: the modules the
    cache stage uses (save ``NOT_CACHE_CODE``), the encoders made elsewhere included, and the dataset's own modules
    (an image folder's fingerprint hashes its files, not the pixels its code decodes)."""
    stage = importlib.import_module(CACHE_STAGE)  # not at the top: the cache stage imports this module
    used = [*modules_used(stage, "ssl_fusion.", NOT_CACHE_CODE), *dataset_modules(dataset)]
    return tuple(dict.fromkeys(Path(module.__file__).resolve() for module in used))


@functools.cache
def sources_sha256(paths: tuple[Path, ...]) -> str:
    """A hash of the files' contents in order; read once per process (the imported code does not change)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def with_overrides(recipe: PretextConfig, overrides: TrainOverrides) -> PretextConfig:
    """Apply the stage-wide ``train.*`` overrides to a pretext's own recipe: its batch becomes the global batch over
    this stage's processes, and its learning rate follows it by ``train.lr_scaling``. An encoder's key and manifest
    hold the recipe so made."""
    batch = overrides.global_batch(recipe.batch_size, distributed.processes())
    changes = {"batch_size": batch, "lr": overrides.scaled_lr(recipe.lr, recipe.batch_size, batch)}
    if overrides.epochs is not None:
        changes["epochs"] = overrides.epochs
    if overrides.epochs_scale is not None and "epochs" not in changes:
        changes["epochs"] = round(recipe.epochs * overrides.epochs_scale)
    return dataclasses.replace(recipe, **changes)


def pretext_recipe(name: str, overrides: TrainOverrides) -> PretextConfig:
    """A pretext's recipe as written in ``conf/pretext/<name>.yaml``, with the stage-wide overrides."""
    return with_overrides(load_option(PRETEXTS, name), overrides)


def computed_by(ctx: StageData) -> dict[str, str]:
    """What computes an artifact, as its key holds it: the device kind (``cpu``, ``cuda``: their kernels round
    differently, not which GPU) and the autocast precision (``float32``, ``bfloat16``, ``float16``)."""
    return {"device": ctx.device.type, "precision": str(ctx.dtype).removeprefix("torch.")}


def encoder_artifact(ctx: StageData, recipe: PretextConfig, max_steps_per_epoch: int | None) -> str:
    key = content_key(
        {
            "stage": "pretrain",
            "code": sources_sha256(pretrain_sources(recipe.name, ctx.for_pretraining().dataset_cfg.name)),
            "pretext": as_plain(recipe),
            "encoder": as_plain(ctx.encoder_cfg),
            "train_data": ctx.pretraining.fingerprints["train"],
            "seed": ctx.seed,
            "max_steps_per_epoch": max_steps_per_epoch,
            "compute": computed_by(ctx),
            "compile": ctx.overrides.compile,
        }
    )
    return f"{recipe.name}-{key}"


def features_artifact(ctx: StageData, encoder_name: str) -> str:
    code = sources_sha256(cache_sources(ctx.dataset_cfg.name))
    key = content_key(
        {"stage": "cache", "code": code, "encoder": encoder_name, "data": ctx.fingerprints, "compute": computed_by(ctx)}
    )
    return f"{encoder_name.split('-')[0]}-{key}"


def external_features_artifact(ctx: StageData, name: str, cfg: ExternalEncoderConfig) -> str:
    """The features of an encoder made elsewhere: keyed by its architecture, the content of its weights file (the
    checkpoint's or the hub's, not its path), the input conversion, the data, the device kind and precision, and the
    code that builds and runs it."""
    cfg = resolve_input(cfg, pretrained_source(cfg.arch, dataclasses.asdict(cfg)))  # a no-op on a checked config
    source = weights_source(cfg, ctx.store)
    encoder = {**dataclasses.asdict(cfg), "checkpoint": None if source is None else source["sha256"]}
    code = sources_sha256(cache_sources(ctx.dataset_cfg.name))
    key = content_key(
        {
            "stage": "cache external",
            "code": code,
            "encoder": encoder,
            "data": ctx.fingerprints,
            "compute": computed_by(ctx),
        }
    )
    return f"{name}-{key}"


def views_artifact(
    encoder_name: str,
    views: int,
    max_shift: float,
    data_fingerprints: dict[str, str],
    dataset: str,
) -> str:
    key = content_key(
        {
            "stage": "cache views",
            "code": sources_sha256(cache_sources(dataset)),
            "encoder": encoder_name,
            "views": views,
            "max_shift": max_shift,
            "train_data": data_fingerprints["train"],
        }
    )
    return f"{encoder_name.split('-')[0]}-{key}"


def load_encoder(store: ArtifactStore, name: str) -> Encoder:
    manifest = store.manifest(ENCODERS_KIND, name)
    if manifest is None:
        raise UserError(f"encoder artifact '{name}' is not in the store '{store.root}'")
    encoder_cfg = ENCODERS.typed_config(manifest["config"]["encoder"], key="encoder")
    encoder = build_encoder(encoder_cfg, manifest["data"]["channels"])
    state = torch.load(store.folder(ENCODERS_KIND, name) / "encoder.pt", weights_only=True, map_location="cpu")
    encoder.load_state_dict(state)
    return encoder


def artifact_exists(store: ArtifactStore, kind: str, name: str) -> bool:
    """Whether a complete artifact (one with its manifest) is stored, without hashing its files."""
    return (store.folder(kind, name) / MANIFEST).is_file()


def load_views(store: ArtifactStore, name: str) -> torch.Tensor:
    """A stored views artifact: float16 features (views, train samples, dim), memory-mapped; read (and its hash
    checked) once per process unless a file of it changes."""
    if not artifact_exists(store, VIEWS_KIND, name):
        raise UserError(f"views artifact '{name}' is not in the store '{store.root}'")
    return _load_views(store.root.resolve(), name, _files_state(store.folder(VIEWS_KIND, name)))


@functools.lru_cache(maxsize=8)
def _load_views(root: Path, name: str, files_state: tuple[tuple[str, int, int], ...]) -> torch.Tensor:
    store = ArtifactStore(root)
    manifest, folder = store.manifest(VIEWS_KIND, name), store.folder(VIEWS_KIND, name)
    views = np.load(folder / "train_views.npy", mmap_mode="c")
    expected = (manifest["config"]["views"], manifest["metrics"]["n_train"])
    if views.ndim != 3 or views.shape[:2] != expected:
        raise UserError(
            f"views artifact '{folder}': train_views.npy has shape {views.shape}, not {expected} + (dim,); "
            f"delete '{folder}' to rebuild it"
        )
    return torch.from_numpy(views)


def load_features(store: ArtifactStore, name: str) -> FeatureSet:
    """A stored feature artifact, its files checked against their hashes. Jobs of one multirun share the
    process: an artifact is read (and its statistics computed) once, again only if a file of it changes."""
    folder = store.folder(FEATURES_KIND, name)
    if not artifact_exists(store, FEATURES_KIND, name):
        raise UserError(f"feature artifact '{name}' is not in the store '{store.root}'")
    return _load_features(store.root.resolve(), name, _files_state(folder))


def _files_state(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, size and modification time of every file: what invalidates a loaded artifact."""
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))


@functools.lru_cache(maxsize=8)
def _load_features(root: Path, name: str, files_state: tuple[tuple[str, int, int], ...]) -> FeatureSet:
    store = ArtifactStore(root)
    manifest = store.manifest(FEATURES_KIND, name)
    if manifest is None:
        raise UserError(f"feature artifact '{name}' is not in the store '{store.root}'")
    folder = store.folder(FEATURES_KIND, name)
    arrays = {
        stem: torch.from_numpy(np.load(folder / f"{stem}.npy"))
        for stem in ("train", "test", "train_labels", "test_labels")
    }
    for split in SPLITS:
        rows, labels = len(arrays[split]), len(arrays[f"{split}_labels"])
        if rows != labels or arrays[split].dim() != 2:
            raise UserError(
                f"feature artifact '{folder}': {split}.npy has shape {tuple(arrays[split].shape)} for "
                f"{labels} labels, one row per label is needed; delete '{folder}' to rebuild it"
            )
    return FeatureSet(
        arrays["train"].float(),
        arrays["test"].float(),
        arrays["train_labels"].long(),
        arrays["test_labels"].long(),
        uses_labels=bool(manifest["config"].get("uses_labels", False)),
    )
