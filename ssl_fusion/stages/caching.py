"""Caching, without Hydra: frozen features (and augmented views) of each encoder for the train and test splits,
computed once, checked and published in the store. ``sslfuse cache`` (``stages/cache.py``) and ``sslfuse run`` call
these through the feature sources; the features key hashes the modules this one imports."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ssl_fusion.config import CacheConfig
from ssl_fusion.data.augment import shift_flip, shift_flip_params
from ssl_fusion.data.convert import converter, describe
from ssl_fusion.evaluation.probe import encode_batches
from ssl_fusion.models.external import ExternalEncoderConfig, build_external, conversion, weights_source
from ssl_fusion.pretexts import PRETEXTS, Pretext
from ssl_fusion.runtime import distributed
from ssl_fusion.runtime.device import prepare_model
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.progress import image_progress
from ssl_fusion.stages import user_overrides
from ssl_fusion.stages.context import StageContext
from ssl_fusion.store.artifacts import (
    ENCODERS_KIND,
    FEATURES_KIND,
    SPLITS,
    VIEWS_KIND,
    encoder_artifact,
    external_features_artifact,
    features_artifact,
    load_encoder,
    pretext_recipe,
    views_artifact,
)

log = logging.getLogger("sslfuse")


def stored_encoder(ctx: StageContext, pretext: str, pretrain_command: str) -> str:
    """The artifact name of the stored encoder for ``pretext``; a UserError naming the command if absent."""
    name = encoder_artifact(ctx, pretext_recipe(pretext, ctx.overrides), ctx.overrides.max_steps_per_epoch)
    if ctx.store.manifest(ENCODERS_KIND, name) is None:
        raise UserError(
            f"no stored encoder for pretext '{pretext}' in '{ctx.store.root}'; make it with: {pretrain_command}"
        )
    return name


def stored_pretext(encoder_config: dict, encoder_name: str) -> type[Pretext]:
    """The pretext a stored encoder was trained by (from its manifest's config): its ``encoder_input`` turns images into
    what that encoder was trained on. Refused if the input the manifest records is not the one the pretext gives."""
    pretext = encoder_config["pretext"]["name"]
    pretext_cls: type[Pretext] = PRETEXTS.get(pretext).impl
    recorded = encoder_config.get("input", pretext_cls.encoder_input_kind)
    if recorded != pretext_cls.encoder_input_kind:
        raise UserError(
            f"encoder '{encoder_name}' was trained on {recorded}, but pretext '{pretext}' feeds its encoder "
            f"{pretext_cls.encoder_input_kind}; pretrain it again"
        )
    return pretext_cls


def shard_path(scratch: Path, split: str, part: int) -> Path:
    return scratch / f"{split}.rank{part}.npy"


def open_features(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A float16 .npy to write through a memory map, its blocks allocated first: on a disk that fills up meanwhile,
    this fails with ENOSPC (a one-line refusal from the store's staging) instead of a write through the map killing
    the process with SIGBUS."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    with open(path, "r+b") as handle:
        os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    return out


def features_bytes(ctx: StageContext, dim: int, copies: int = 1) -> int:
    """The bytes the features of both splits (float16) and their labels (int64) take, ``copies`` times over."""
    rows = len(ctx.data.train_labels) + len(ctx.data.test_labels)
    return rows * (2 * dim * copies + 8)


def check_features(path: Path, encoder: str, chunk: int = 1 << 16) -> None:
    """Refuse in one line features that carry nothing: NaN or infinite values (broken weights or ``mean``/``std``;
    float16 holds at most 65504), or one vector for every image (e.g. all zeros)."""
    array = np.load(path, mmap_mode="r")
    rows = array.reshape(-1, array.shape[-1])
    low, high = np.full(rows.shape[1], np.inf, np.float32), np.full(rows.shape[1], -np.inf, np.float32)
    for offset in range(0, len(rows), chunk):
        part = rows[offset : offset + chunk].astype(np.float32)
        if not np.isfinite(part).all():
            kind = "NaN" if np.isnan(part).any() else "infinite (beyond float16's 65504)"
            raise UserError(
                f"encoder '{encoder}' gives {kind} features ({path.stem}); are its weights, mean and std "
                "sound? nothing was cached"
            )
        np.minimum(low, part.min(axis=0), out=low)
        np.maximum(high, part.max(axis=0), out=high)
    if len(rows) > 1 and np.array_equal(low, high):
        raise UserError(
            f"encoder '{encoder}' gives the same features for every image ({path.stem}); are its weights "
            "sound? nothing was cached"
        )


def write_split(
    ctx: StageContext,
    encoder,
    split: str,
    batch_size: int,
    scratch: Path,
    progress,
    pretext_cls: type[Pretext],
    convert: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    num_workers: int = 0,
) -> None:
    """Stream features of one split into a float16 .npy (memory-mapped), batch by batch; the encoder is fed the
    images ``convert``ed to its pretraining data's form, then the pretext's ``encoder_input`` of them, as in
    pretraining.
    Images left on disk (an image folder) are decoded batch by batch by ``num_workers`` DataLoader workers.

    Under torchrun each rank writes its contiguous block of the split to a shard file for rank 0
    to merge. For an image-free pretext (the ``noise`` control) each sample gets a seeded Gaussian vector instead.
    """
    images, labels = ctx.data.split(split)
    start, stop = distributed.shard_bounds(len(images))
    target = (
        scratch / f"{split}.npy" if distributed.world_size() == 1 else shard_path(scratch, split, distributed.rank())
    )
    out = open_features(target, (stop - start, encoder.out_dim))
    task = progress.add_task(f"cache {split}", total=stop - start, status="")

    def store_batch(offset: int, features: torch.Tensor) -> None:
        out[offset : offset + len(features)] = features.numpy().astype(np.float16)
        progress.advance(task, len(features))

    if pretext_cls.ignores_images:
        store_batch(0, noise_features(ctx, split, encoder.out_dim)[start:stop])
    else:
        encode_batches(
            encoder,
            images[start:stop],
            batch_size,
            ctx.device,
            ctx.dtype,
            store_batch,
            None if convert is None else lambda _, batch: convert(batch),
            pretext_cls.encoder_input,
            num_workers,
        )
    out.flush()
    if distributed.is_main():
        np.save(scratch / f"{split}_labels.npy", labels.numpy())


def noise_features(ctx: StageContext, split: str, dim: int) -> torch.Tensor:
    """The ``noise`` control's features of a split: one seeded Gaussian vector per sample, whatever the image."""
    generator = torch.Generator().manual_seed(ctx.seed * 2 + (split == "test"))
    return torch.randn(len(ctx.data.split(split)[1]), dim, generator=generator)


def merge_shards(scratch: Path, split: str, length: int, dim: int, chunk: int = 1 << 16) -> None:
    """Concatenate the ranks' shard files of a split into ``<split>.npy`` in rank order, chunk by chunk."""
    out = open_features(scratch / f"{split}.npy", (length, dim))
    for part in range(distributed.world_size()):
        start, _ = distributed.shard_bounds(length, part)
        path = shard_path(scratch, split, part)
        shard = np.load(path, mmap_mode="r")
        for offset in range(0, len(shard), chunk):
            piece = shard[offset : offset + chunk]
            out[start + offset : start + offset + len(piece)] = piece
        del shard
        path.unlink()
    out.flush()
    del out


def refused_on_all(check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 and raise its UserError on every rank, so that no rank waits for one that stopped."""

    def refusal() -> Optional[str]:
        try:
            check()
        except UserError as error:
            return str(error)
        return None

    message = distributed.on_main(refusal)
    if message is not None:
        raise UserError(message)


@contextlib.contextmanager
def shared_staging(ctx: StageContext, name: str) -> Iterator[Path]:
    """The store's staging folder for ``name``, made by rank 0; every rank gets its path."""
    with distributed.main_only(ctx.store.staging(FEATURES_KIND, name)) as scratch:
        yield Path(distributed.broadcast(str(scratch) if distributed.is_main() else None))


def encoder_conversion(
    ctx: StageContext, encoder_name: str
) -> tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], dict]:
    """How the downstream images become what the stored encoder was pretrained on (channels, size), and the manifest
    field that records it (empty when nothing changes); a one-line UserError when it cannot be done."""
    trained = ctx.store.manifest(ENCODERS_KIND, encoder_name)["data"]
    shape = (ctx.data.channels, ctx.data.image_size, trained["channels"], tuple(trained["image_size"]))
    convert = converter(*shape)
    return convert, {} if convert is None else {"conversion": describe(*shape)}


def ensure_features(
    ctx: StageContext, encoder_name: str, batch_size: int, num_workers: int = 0
) -> tuple[str, dict, bool]:
    """Cached features of a stored encoder: reused when present, else computed and published.

    Under torchrun every rank encodes its shard of each split; rank 0 alone holds the store lock,
    merges the shards and publishes one artifact, laid out as a single process writes it.
    """
    name = features_artifact(ctx, encoder_name)
    with distributed.main_only(ctx.store.lock(FEATURES_KIND, name)):
        manifest = distributed.on_main(lambda: ctx.store.manifest(FEATURES_KIND, name))
        if manifest is not None:
            log.info("reused cached features %s (no encoder run)", name)
            return name, manifest, True
        encoder = prepare_model(load_encoder(ctx.store, encoder_name), ctx.device)
        encoder_config = ctx.store.manifest(ENCODERS_KIND, encoder_name)["config"]
        pretext_cls = stored_pretext(encoder_config, encoder_name)
        convert, recorded = encoder_conversion(ctx, encoder_name)
        refused_on_all(
            lambda: ctx.store.check_space(
                FEATURES_KIND, name, features_bytes(ctx, encoder.out_dim, 2 if distributed.world_size() > 1 else 1)
            )
        )
        started = time.perf_counter()
        with shared_staging(ctx, name) as scratch, image_progress(enabled=distributed.is_main()) as progress:
            for split in SPLITS:
                write_split(ctx, encoder, split, batch_size, scratch, progress, pretext_cls, convert, num_workers)
            distributed.barrier()
            if distributed.is_main():
                manifest = publish_features(
                    ctx, name, encoder_name, encoder_config, encoder.out_dim, scratch, started, recorded
                )
    return name, distributed.broadcast(manifest), False


def ensure_external_features(
    ctx: StageContext,
    name: str,
    cfg: ExternalEncoderConfig,
    batch_size: int,
    num_workers: int = 0,
) -> tuple[str, dict, bool]:
    """Cached features of the encoder made elsewhere that ``+external.<name>`` declares: reused when present, else
    computed by one process and published, the input conversion in the manifest."""
    if distributed.launched():
        raise UserError(f"external encoder '{name}' is cached by one process; run it without torchrun")
    artifact = external_features_artifact(ctx, name, cfg)
    with ctx.store.lock(FEATURES_KIND, artifact):
        manifest = ctx.store.manifest(FEATURES_KIND, artifact)
        if manifest is not None:
            log.info("reused cached features %s (no encoder run)", artifact)
            return artifact, manifest, True
        encoder, found = build_external(cfg, ctx.data.channels)
        encoder = prepare_model(encoder, ctx.device)
        extra = {
            "external": {
                **dataclasses.asdict(cfg),
                "format": found,
                "source": weights_source(cfg, ctx.store),
                "conversion": conversion(cfg, ctx.data.channels, ctx.data.image_size),
            }
        }
        ctx.store.check_space(FEATURES_KIND, artifact, features_bytes(ctx, encoder.out_dim))
        started = time.perf_counter()
        with ctx.store.staging(FEATURES_KIND, artifact) as scratch, image_progress() as progress:
            for split in SPLITS:
                write_split(ctx, encoder, split, batch_size, scratch, progress, Pretext, num_workers=num_workers)
            manifest = publish_features(
                ctx,
                artifact,
                f"external {cfg.arch}",
                {"uses_labels": False},
                encoder.out_dim,
                scratch,
                started,
                extra,
                label=name,
            )
    return artifact, manifest, False


def write_views(
    ctx: StageContext,
    encoder,
    pretext_cls: type[Pretext],
    cache: CacheConfig,
    path: Path,
    progress,
    convert: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> None:
    """Stream the features of ``cache.views`` augmented copies of the train split into a float16 .npy
    (views, samples, dim). View v's shifts and mirrors come from a CPU generator seeded with v, drawn for the
    whole split at once: the same augmented images for every encoder, batch size and device. The encoder is fed
    the pretext's ``encoder_input`` of each augmented image. The ``noise`` control's features ignore the image,
    so each of its views repeats its plain train features. An image folder is read from disk once per view."""
    images = ctx.data.train_images
    out = open_features(path, (cache.views, len(images), encoder.out_dim))
    task = progress.add_task("cache views", total=cache.views * len(images), status="")
    for view in range(cache.views):
        params = shift_flip_params(len(images), cache.views_max_shift, generator=torch.Generator().manual_seed(view))

        def store_batch(offset: int, features: torch.Tensor, view: int = view) -> None:
            out[view, offset : offset + len(features)] = features.numpy().astype(np.float16)
            progress.advance(task, len(features))

        def augment(offset: int, batch: torch.Tensor, params: torch.Tensor = params) -> torch.Tensor:
            shifted = shift_flip(batch, params[offset : offset + len(batch)].to(batch.device))
            return shifted if convert is None else convert(shifted)

        if pretext_cls.ignores_images:
            store_batch(0, noise_features(ctx, "train", encoder.out_dim))
        else:
            encode_batches(
                encoder,
                images,
                cache.batch_size,
                ctx.device,
                ctx.dtype,
                store_batch,
                augment,
                pretext_cls.encoder_input,
                cache.num_workers,
            )
    out.flush()


def ensure_views(ctx: StageContext, encoder_name: str, cache: CacheConfig) -> tuple[str, bool]:
    """The encoder's cached features of ``cache.views`` augmented copies of every train image (``write_views``):
    reused when stored, else computed and published. Returns the artifact name and whether it was reused."""
    name = views_artifact(encoder_name, cache.views, cache.views_max_shift, ctx.fingerprints, ctx.dataset_cfg.name)
    with ctx.store.lock(VIEWS_KIND, name):
        if ctx.store.manifest(VIEWS_KIND, name) is not None:
            log.info("reused cached views %s (no encoder run)", name)
            return name, True
        encoder = prepare_model(load_encoder(ctx.store, encoder_name), ctx.device)
        pretext_cls = stored_pretext(ctx.store.manifest(ENCODERS_KIND, encoder_name)["config"], encoder_name)
        n_images = cache.views * len(ctx.data.train_labels)
        ctx.store.check_space(VIEWS_KIND, name, n_images * encoder.out_dim * 2)
        started = time.perf_counter()
        with ctx.store.staging(VIEWS_KIND, name) as scratch, image_progress() as progress:
            write_views(
                ctx,
                encoder,
                pretext_cls,
                cache,
                scratch / "train_views.npy",
                progress,
                encoder_conversion(ctx, encoder_name)[0],
            )
            check_features(scratch / "train_views.npy", encoder_name)
            seconds = time.perf_counter() - started
            ctx.store.publish(
                VIEWS_KIND,
                name,
                scratch,
                {
                    "config": {
                        "encoder_artifact": encoder_name,
                        "views": cache.views,
                        "max_shift": cache.views_max_shift,
                        "dtype": "float16",
                    },
                    "data": {"train": ctx.fingerprints["train"]},
                    "metrics": {"dim": encoder.out_dim, "n_train": len(ctx.data.train_labels)},
                    "timings": {"seconds": seconds, "images_per_second": n_images / seconds},
                    "runtime": {"device": str(ctx.device), "precision": str(ctx.dtype).removeprefix("torch.")},
                },
            )
    log.info("cached %d augmented images for %s in %.0f s (%.0f img/s)", n_images, name, seconds, n_images / seconds)
    return name, False


def publish_features(
    ctx: StageContext,
    name: str,
    encoder_name: str,
    encoder_config: dict,
    dim: int,
    scratch: Path,
    started: float,
    extra: Optional[dict] = None,
    label: Optional[str] = None,
) -> dict:
    """Merge the ranks' shards (if any), check the features (``check_features``; ``label``: the encoder's name for
    the user, else ``encoder_name``), publish the features artifact and return its manifest (``extra``: more of its
    config, such as an external encoder's input conversion)."""
    if distributed.world_size() > 1:
        for split in SPLITS:
            merge_shards(scratch, split, len(ctx.data.split(split)[1]), dim)
    for split in SPLITS:
        check_features(scratch / f"{split}.npy", label or encoder_name)
    seconds = time.perf_counter() - started
    n_images = len(ctx.data.train_labels) + len(ctx.data.test_labels)
    manifest = ctx.store.publish(
        FEATURES_KIND,
        name,
        scratch,
        {
            "config": {
                "encoder_artifact": encoder_name,
                "dataset": ctx.dataset_cfg.name,
                "dtype": "float16",
                "uses_labels": encoder_config["uses_labels"],
                **(extra or {}),
            },
            "data": ctx.fingerprints,
            "metrics": {"dim": dim, "n_train": len(ctx.data.train_labels), "n_test": len(ctx.data.test_labels)},
            "timings": {"seconds": seconds, "images_per_second": n_images / seconds},
            "runtime": {
                "device": str(ctx.device),
                "precision": str(ctx.dtype).removeprefix("torch."),
                "processes": distributed.world_size(),
            },
        },
    )
    log.info("cached features %s: %d images at %.0f img/s", name, n_images, n_images / seconds)
    return manifest


def pretrain_command(pretext: str) -> str:
    extra = user_overrides(("pretexts", "cache", "pretext", "seed"), rename={"encoder_seed": "seed"})
    return " ".join(["sslfuse pretrain", f"pretext={pretext}", *extra])
