"""The pretraining loop: in-memory uint8 batches, autocast (with loss scaling under fp16), AdamW with
warmup + cosine, resumable.

A checkpoint (model, optimizer, scheduler, loss scaler, CPU and CUDA RNG states, epoch, losses) is written
atomically after every epoch; a restarted run with the same checkpoint path continues from the last
complete epoch.

Under torchrun (see ``ssl_fusion.runtime.distributed``) the recipe's batch size is the global batch: every
rank draws the same seeded epoch order, takes every world_size-th sample of it and trains through
DistributedDataParallel; only rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ssl_fusion.data.batches import Images, uint8_batches
from ssl_fusion.pretexts import Pretext, PretextConfig
from ssl_fusion.runtime import distributed
from ssl_fusion.runtime.device import autocast, grad_scaler
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.progress import image_progress

log = logging.getLogger("sslfuse")


@dataclass
class TrainResult:
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images_seen: int = 0
    resumed_at_epoch: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.seconds if self.seconds else 0.0


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def save_checkpoint(path: Path, state: dict) -> None:
    """Temporary file, fsync, rename: a kill at any moment leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """The CPU RNG state and, where CUDA is available, every CUDA device's."""
    state: dict[str, Any] = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], checkpoint: Path) -> None:
    """Set the RNG states saved by ``rng_state``; a checkpoint without CUDA states (written before they were
    kept, or without CUDA) or with another number of devices restores the CPU state only."""
    torch.set_rng_state(state["rng"])
    if not torch.cuda.is_available():
        return
    cuda_states = state.get("cuda_rng")
    if cuda_states is not None and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    else:
        log.warning("checkpoint %s holds no CUDA RNG state for %d devices: the resumed run may draw other GPU random "
                    "numbers than an uninterrupted one", checkpoint, torch.cuda.device_count())


def epoch_order(length: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded sample order of one epoch; the same on every rank."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def train_pretext(
    model: Pretext,
    images: Images,
    labels: torch.Tensor,
    recipe: PretextConfig,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    checkpoint: Path,
    max_steps_per_epoch: Optional[int] = None,
    num_workers: int = 0,
) -> TrainResult:
    """Train ``model`` on ``images``: a uint8 tensor in memory, sliced per batch, or images on disk (an image folder)
    that ``num_workers`` DataLoader workers decode batch by batch, in the same seeded order."""
    batch_size = min(recipe.batch_size, len(images))
    local_batch = distributed.local_batch_size(batch_size)
    steps_per_epoch = len(images) // batch_size
    if max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    total_steps = recipe.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = warmup_cosine(total_steps, max(1, int(recipe.warmup_epochs * steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = grad_scaler(device, dtype)
    result = TrainResult()
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state, checkpoint)
        result.epoch_losses = list(state["epoch_losses"])
        result.resumed_at_epoch = len(result.epoch_losses)
        log.info("resuming %s from checkpoint %s after epoch %d", recipe.name, checkpoint, result.resumed_at_epoch)
    distributed.prepare_training(model, device, type(model).sync_batchnorm)
    model.train()
    with image_progress(enabled=distributed.is_main()) as progress:
        for epoch in range(result.resumed_at_epoch, recipe.epochs):
            task = progress.add_task(f"{recipe.name} epoch {epoch + 1}/{recipe.epochs}", total=steps_per_epoch * batch_size, status="")
            started = time.perf_counter()
            distributed.reseed_augmentations(seed, epoch)
            order = distributed.local_order(epoch_order(len(images), seed, epoch))
            loss_sum = torch.zeros((), device=device)
            batches = uint8_batches(images, local_batch, device.type == "cuda", num_workers, order[: steps_per_epoch * local_batch])
            for step, batch in zip(range(steps_per_epoch), batches):
                index = order[step * local_batch : (step + 1) * local_batch]
                batch = batch.to(device, non_blocking=True).float().div_(255)
                with autocast(device, dtype):
                    loss = model.loss(batch, labels[index].to(device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                distributed.average_gradients(model)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach()
                if step % 20 == 19 or step == steps_per_epoch - 1:
                    running = float(distributed.average(loss_sum)) / (step + 1)
                    if not math.isfinite(running):
                        raise UserError(
                            f"pretraining {recipe.name} diverged: loss is {running} at epoch {epoch + 1} step {step + 1}; "
                            f"the last good checkpoint is kept at '{checkpoint}'; lower pretext.lr"
                        )
                    progress.update(task, status=f"loss {running:.4f}")
                progress.advance(task, batch_size)
            result.epoch_losses.append(float(distributed.average(loss_sum)) / steps_per_epoch)
            epoch_seconds = time.perf_counter() - started
            result.seconds += epoch_seconds
            result.images_seen += steps_per_epoch * batch_size
            if distributed.is_main():
                save_checkpoint(
                    checkpoint,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        **rng_state(),
                        "epoch_losses": result.epoch_losses,
                    },
                )
            log.info(
                "%s epoch %d/%d: loss %.4f, %.0f img/s, %.0f s",
                recipe.name, epoch + 1, recipe.epochs, result.epoch_losses[-1], steps_per_epoch * batch_size / epoch_seconds, epoch_seconds,
            )
    return result
