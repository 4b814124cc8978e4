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
from torch import nn

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
from ssl_fusion.stages.feature_writer import FeatureWriter
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

VIEWS_STEM = "train_views"  # the views artifact's array: (views, samples, dim)


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


def shard_path(scratch: Path, stem: str, part: int) -> Path:
    return scratch / f"{stem}.rank{part}.npy"


def rank_path(scratch: Path, stem: str) -> Path:
    """The file this process writes of ``<stem>.npy``: the whole of it, or under torchrun its rank's shard."""
    return scratch / f"{stem}.npy" if distributed.world_size() == 1 else shard_path(scratch, stem, distributed.rank())


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
    """Stream features of one split into a float16 .npy (memory-mapped), batch by batch (``FeatureWriter``); the
    encoder is fed the images ``convert``ed to its pretraining data's form, then the pretext's ``encoder_input`` of
    them, as in pretraining.
    Images left on disk (an image folder) are decoded batch by batch by ``num_workers`` DataLoader workers.

    Under torchrun each rank writes its contiguous block of the split to a shard file for rank 0
    to merge. For an image-free pretext (the ``noise`` control) each sample gets a seeded Gaussian vector instead.
    """
    images, labels = ctx.data.split(split)
    start, stop = distributed.shard_bounds(len(images))
    out = open_features(rank_path(scratch, split), (stop - start, encoder.out_dim))
    task = progress.add_task(f"cache {split}", total=stop - start, status="")
    with FeatureWriter(out, ctx.device) as writer:

        def store_batch(offset: int, features: torch.Tensor) -> None:
            writer.write((slice(offset, offset + len(features)),), features)
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
                keep_on_device=True,
            )
    out.flush()
    if distributed.is_main():
        np.save(scratch / f"{split}_labels.npy", labels.numpy())


def noise_features(ctx: StageContext, split: str, dim: int) -> torch.Tensor:
    """The ``noise`` control's features of a split: one seeded Gaussian vector per sample, whatever the image."""
    generator = torch.Generator().manual_seed(ctx.seed * 2 + (split == "test"))
    return torch.randn(len(ctx.data.split(split)[1]), dim, generator=generator)


def merge_shards(scratch: Path, stem: str, shape: tuple[int, ...], chunk: int = 1 << 16) -> None:
    """Concatenate the ranks' shard files of ``<stem>.npy`` (``shape``: ``(samples, dim)``, or ``(views, samples,
    dim)`` with each rank's block of samples in every view) in rank order along the samples, chunk by chunk."""
    out = open_features(scratch / f"{stem}.npy", shape)
    blocks = out.reshape(-1, *shape[-2:])  # (views or 1, samples, dim), through the same map
    for part in range(distributed.world_size()):
        start, _ = distributed.shard_bounds(shape[-2], part)
        path = shard_path(scratch, stem, part)
        shard = np.load(path, mmap_mode="r").reshape(len(blocks), -1, shape[-1])
        for block, rows in zip(blocks, shard):
            for offset in range(0, len(rows), chunk):
                piece = rows[offset : offset + chunk]
                block[start + offset : start + offset + len(piece)] = piece
        del shard
        path.unlink()
    out.flush()
    del blocks, out


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
def shared_staging(ctx: StageContext, kind: str, name: str) -> Iterator[Path]:
    """The store's staging folder for artifact ``name`` of ``kind``, made by rank 0; every rank gets its path."""
    with distributed.main_only(ctx.store.staging(kind, name)) as scratch:
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


@dataclasses.dataclass
class Encoding:
    """What makes a features artifact and what its manifest says of it: the encoder (on the device), the pretext
    whose ``encoder_input`` feeds it, the conversion of the downstream images, the ``encoder_artifact`` and
    ``uses_labels`` recorded, more of the manifest's config, and the encoder's name in refusals (else ``source``)."""

    encoder: nn.Module
    pretext: type[Pretext]
    convert: Optional[Callable[[torch.Tensor], torch.Tensor]]
    source: str
    uses_labels: bool
    extra: dict
    label: Optional[str] = None


def sharded_features(
    ctx: StageContext, name: str, encoding: Callable[[], Encoding], batch_size: int, num_workers: int
) -> tuple[str, dict, bool]:
    """The features artifact ``name``: reused when present, else computed with ``encoding()`` and published.

    Under torchrun every rank encodes its shard of each split; rank 0 alone holds the store lock,
    merges the shards and publishes one artifact, laid out as a single process writes it.
    """
    with distributed.main_only(ctx.store.lock(FEATURES_KIND, name)):
        manifest = distributed.on_main(lambda: ctx.store.manifest(FEATURES_KIND, name))
        if manifest is not None:
            log.info("reused cached features %s (no encoder run)", name)
            return name, manifest, True
        made = encoding()
        copies = 2 if distributed.world_size() > 1 else 1
        refused_on_all(
            lambda: ctx.store.check_space(FEATURES_KIND, name, features_bytes(ctx, made.encoder.out_dim, copies))
        )
        started = time.perf_counter()
        with shared_staging(ctx, FEATURES_KIND, name) as scratch, image_progress(enabled=distributed.is_main()) as bar:
            for split in SPLITS:
                write_split(ctx, made.encoder, split, batch_size, scratch, bar, made.pretext, made.convert, num_workers)
            distributed.barrier()
            if distributed.is_main():
                manifest = publish_features(ctx, name, made, scratch, started)
    return name, distributed.broadcast(manifest), False


def ensure_features(
    ctx: StageContext, encoder_name: str, batch_size: int, num_workers: int = 0
) -> tuple[str, dict, bool]:
    """Cached features of a stored encoder: reused when present, else computed and published (``sharded_features``)."""

    def encoding() -> Encoding:
        encoder = prepare_model(load_encoder(ctx.store, encoder_name), ctx.device)
        encoder_config = ctx.store.manifest(ENCODERS_KIND, encoder_name)["config"]
        pretext_cls = stored_pretext(encoder_config, encoder_name)
        convert, recorded = encoder_conversion(ctx, encoder_name)
        return Encoding(encoder, pretext_cls, convert, encoder_name, encoder_config["uses_labels"], recorded)

    return sharded_features(ctx, features_artifact(ctx, encoder_name), encoding, batch_size, num_workers)


def ensure_external_features(
    ctx: StageContext,
    name: str,
    cfg: ExternalEncoderConfig,
    batch_size: int,
    num_workers: int = 0,
) -> tuple[str, dict, bool]:
    """Cached features of the encoder made elsewhere that ``+external.<name>`` declares: reused when present, else
    computed (``sharded_features``) and published, the input conversion in the manifest."""

    def encoding() -> Encoding:
        encoder, found = build_external(cfg, ctx.data.channels)
        extra = {
            "external": {
                **dataclasses.asdict(cfg),
                "format": found,
                "source": weights_source(cfg, ctx.store),
                "conversion": conversion(cfg, ctx.data.channels, ctx.data.image_size),
            }
        }
        return Encoding(prepare_model(encoder, ctx.device), Pretext, None, f"external {cfg.arch}", False, extra, name)

    artifact = external_features_artifact(ctx, name, cfg)
    return sharded_features(ctx, artifact, encoding, batch_size, num_workers)


def write_views(
    ctx: StageContext,
    encoder,
    pretext_cls: type[Pretext],
    cache: CacheConfig,
    scratch: Path,
    progress,
    convert: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> None:
    """Stream the features of ``cache.views`` augmented copies of the train split into a float16 .npy
    (views, samples, dim), ``train_views.npy``. View v's shifts and mirrors come from a CPU generator seeded with v,
    drawn for the whole split at once: the same augmented images for every encoder, batch size, device and number of
    processes. The encoder is fed the pretext's ``encoder_input`` of each augmented image. The ``noise`` control's
    features ignore the image, so each of its views repeats its plain train features. An image folder is read from
    disk once per view. Under torchrun each rank writes its block of samples of every view to a shard file."""
    images = ctx.data.train_images
    start, stop = distributed.shard_bounds(len(images))
    out = open_features(rank_path(scratch, VIEWS_STEM), (cache.views, stop - start, encoder.out_dim))
    task = progress.add_task("cache views", total=cache.views * (stop - start), status="")
    with FeatureWriter(out, ctx.device) as writer:
        for view in range(cache.views):
            generator = torch.Generator().manual_seed(view)
            params = shift_flip_params(len(images), cache.views_max_shift, generator=generator)[start:stop]

            def store_batch(offset: int, features: torch.Tensor, view: int = view) -> None:
                writer.write((view, slice(offset, offset + len(features))), features)
                progress.advance(task, len(features))

            def augment(offset: int, batch: torch.Tensor, params: torch.Tensor = params) -> torch.Tensor:
                shifted = shift_flip(batch, params[offset : offset + len(batch)].to(batch.device))
                return shifted if convert is None else convert(shifted)

            if pretext_cls.ignores_images:
                store_batch(0, noise_features(ctx, "train", encoder.out_dim)[start:stop])
            else:
                encode_batches(
                    encoder,
                    images[start:stop],
                    cache.batch_size,
                    ctx.device,
                    ctx.dtype,
                    store_batch,
                    augment,
                    pretext_cls.encoder_input,
                    cache.num_workers,
                    keep_on_device=True,
                )
    out.flush()


def ensure_views(ctx: StageContext, encoder_name: str, cache: CacheConfig) -> tuple[str, bool]:
    """The encoder's cached features of ``cache.views`` augmented copies of every train image (``write_views``):
    reused when stored, else computed and published. Returns the artifact name and whether it was reused.

    Under torchrun every rank encodes its block of samples; rank 0 alone holds the store lock, merges the shards
    and publishes, as ``sharded_features`` does."""
    name = views_artifact(encoder_name, cache.views, cache.views_max_shift, ctx.fingerprints, ctx.dataset_cfg.name)
    with distributed.main_only(ctx.store.lock(VIEWS_KIND, name)):
        if distributed.on_main(lambda: ctx.store.manifest(VIEWS_KIND, name) is not None):
            log.info("reused cached views %s (no encoder run)", name)
            return name, True
        encoder = prepare_model(load_encoder(ctx.store, encoder_name), ctx.device)
        pretext_cls = stored_pretext(ctx.store.manifest(ENCODERS_KIND, encoder_name)["config"], encoder_name)
        n_images = cache.views * len(ctx.data.train_labels)
        copies = 2 if distributed.world_size() > 1 else 1
        refused_on_all(lambda: ctx.store.check_space(VIEWS_KIND, name, n_images * encoder.out_dim * 2 * copies))
        started = time.perf_counter()
        with shared_staging(ctx, VIEWS_KIND, name) as scratch, image_progress(enabled=distributed.is_main()) as bar:
            write_views(ctx, encoder, pretext_cls, cache, scratch, bar, encoder_conversion(ctx, encoder_name)[0])
            distributed.barrier()
            if distributed.is_main():
                publish_views(ctx, name, encoder_name, cache, encoder.out_dim, scratch, started)
        distributed.barrier()  # published before any rank goes on
    return name, False


def publish_views(
    ctx: StageContext, name: str, encoder_name: str, cache: CacheConfig, dim: int, scratch: Path, started: float
) -> None:
    """Merge the ranks' shards of the views (if any), check them and publish the views artifact."""
    n_train = len(ctx.data.train_labels)
    if distributed.world_size() > 1:
        merge_shards(scratch, VIEWS_STEM, (cache.views, n_train, dim))
    check_features(scratch / f"{VIEWS_STEM}.npy", encoder_name)
    seconds = time.perf_counter() - started
    n_images = cache.views * n_train
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
            "metrics": {"dim": dim, "n_train": n_train},
            "timings": {"seconds": seconds, "images_per_second": n_images / seconds},
            "runtime": {
                "device": str(ctx.device),
                "precision": str(ctx.dtype).removeprefix("torch."),
                "processes": distributed.world_size(),
            },
        },
    )
    log.info("cached %d augmented images for %s in %.0f s (%.0f img/s)", n_images, name, seconds, n_images / seconds)


def publish_features(ctx: StageContext, name: str, made: Encoding, scratch: Path, started: float) -> dict:
    """Merge the ranks' shards (if any), check the features (``check_features``), publish the features artifact and
    return its manifest."""
    dim = made.encoder.out_dim
    if distributed.world_size() > 1:
        for split in SPLITS:
            merge_shards(scratch, split, (len(ctx.data.split(split)[1]), dim))
    for split in SPLITS:
        check_features(scratch / f"{split}.npy", made.label or made.source)
    seconds = time.perf_counter() - started
    n_images = len(ctx.data.train_labels) + len(ctx.data.test_labels)
    manifest = ctx.store.publish(
        FEATURES_KIND,
        name,
        scratch,
        {
            "config": {
                "encoder_artifact": made.source,
                "dataset": ctx.dataset_cfg.name,
                "dtype": "float16",
                "uses_labels": made.uses_labels,
                **made.extra,
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
