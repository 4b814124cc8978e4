"""The pretraining loop: in-memory uint8 batches, autocast (with loss scaling under fp16), AdamW with
warmup + cosine, resumable.

A checkpoint (model, optimizer, scheduler, loss scaler, CPU and CUDA RNG states, position in the run, losses) is
written atomically after every epoch and, within an epoch, every ``checkpoint_every_minutes`` or
``checkpoint_every_steps``; a restarted run with the same checkpoint path continues from that step, in the same
seeded order, to exactly the weights of an uninterrupted run. A checkpoint that cannot be read or that another run
wrote is refused in one line naming the folder to delete.

Under torchrun (see ``ssl_fusion.runtime.distributed``) the recipe's batch size is the global batch (which
``train.batch_size_per_device`` makes grow with the number of processes, see ``TrainOverrides``): every rank draws
the same seeded epoch order, takes every world_size-th sample of it and trains through DistributedDataParallel; only
rank 0 writes checkpoints and shows progress.

An ``on_epoch`` hook sees each finished epoch (an ``EpochRecord``) on rank 0, for logging or probing the encoder; it
cannot change the training: it runs with torch's RNG states (CPU, and the training device's) forked, and the model is
put back in training mode after it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ssl_fusion.data.batches import Images, uint8_batches
from ssl_fusion.pretexts import Pretext, PretextConfig
from ssl_fusion.runtime import distributed
from ssl_fusion.runtime.device import autocast, grad_scaler
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.progress import image_progress

log = logging.getLogger("sslfuse")

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch_losses")  # what every checkpoint version holds


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch as ``train_pretext``'s ``on_epoch`` hook gets it: its number (from 1), its mean loss, and the
    images per second and seconds of the steps this run trained of it (after a resume mid-epoch: those after it)."""

    epoch: int
    loss: float
    images_per_second: float
    seconds: float


@dataclass
class TrainResult:
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images_seen: int = 0
    resumed_at_epoch: int = 0
    resumed_at_step: int = 0  # steps of epoch ``resumed_at_epoch`` done before the resume
    batch_per_process: int = 0  # each process's share of the global batch (the whole batch in one process)

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


def write_failure(what: str, folder: Path, err: OSError) -> str:
    """One line for a failed write: a full disk said as such, any other reason as the system gives it."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"cannot write {what} into '{folder}': the disk is full (no space left on device); free space there "
            f"or point artifacts_dir at another disk, then rerun"
        )
    return f"cannot write {what} into '{folder}': {err.strerror or err}"


def save_checkpoint(path: Path, state: dict) -> None:
    """Temporary file, fsync, rename: a kill at any moment leaves the previous checkpoint intact. A failed write
    (a full disk) removes the temporary file and is refused in one line; the previous checkpoint stays."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(write_failure("the pretraining checkpoint", path.parent, err)) from None


def rng_state() -> dict[str, Any]:
    """The CPU RNG state and, where CUDA is available, every CUDA device's."""
    state: dict[str, Any] = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def rng_states() -> dict[str, Any]:
    """This rank's RNG states (rank 0's, as ``rng_state``) and, under torchrun, every rank's in ``rank_rng``: a
    resume mid-epoch restores each rank's own augmentation stream."""
    states = rng_state()
    if distributed.is_distributed():
        states["rank_rng"] = distributed.all_objects(states)
    return states


def restore_rng_state(state: dict[str, Any], checkpoint: Path) -> None:
    """Set the RNG states saved by ``rng_states`` (this rank's own where every rank's is kept); a checkpoint without
    CUDA states (written before they were kept, or without CUDA) or with another number of devices restores the CPU
    state only."""
    ranks = state.get("rank_rng")
    if ranks is not None and len(ranks) == distributed.world_size():
        state = ranks[distributed.rank()]
    torch.set_rng_state(state["rng"])
    if not torch.cuda.is_available():
        return
    cuda_states = state.get("cuda_rng")
    if cuda_states is not None and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    else:
        log.warning(
            "checkpoint %s holds no CUDA RNG state for %d devices: the resumed run may draw other GPU random "
            "numbers than an uninterrupted one",
            checkpoint,
            torch.cuda.device_count(),
        )


def epoch_order(length: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded sample order of one epoch; the same on every rank."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def load_checkpoint(
    path: Path,
    run: dict[str, Any],
    model: Pretext,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into the training state and return it. A file that is truncated, no
    checkpoint, or one of another run (``run``: pretext, seed, batch, steps per epoch) is refused in one line that
    names the folder to delete; the process then ends, so no half-loaded state is ever trained on."""
    start_over = f"delete the folder '{path.parent}' to start this pretraining over"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # a truncated zip, a pickle of other objects, a file of another format: torch's words vary
        raise UserError(
            f"the pretraining checkpoint '{path}' cannot be read (truncated, or not a torch checkpoint); {start_over}"
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise UserError(
            f"'{path}' is not a pretraining checkpoint (it lacks {', '.join(CHECKPOINT_KEYS)}); {start_over}"
        )
    if state.get("run", run) != run:
        raise UserError(
            f"the checkpoint '{path}' belongs to another pretraining ({state['run']}, this one is {run}); {start_over}"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state, path)
        epoch_losses = [float(loss) for loss in state["epoch_losses"]]
        step, loss_sum = int(state.get("step", 0)), torch.as_tensor(state.get("loss_sum", 0.0))
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError):
        raise UserError(
            f"the model, optimizer or RNG states in the checkpoint '{path}' do not fit this "
            f"{run['pretext']} pretraining; {start_over}"
        ) from None
    if not 0 <= step < run["steps_per_epoch"]:
        raise UserError(
            f"the checkpoint '{path}' stopped at step {step} of an epoch of {run['steps_per_epoch']}; {start_over}"
        )
    return {"epoch_losses": epoch_losses, "step": step, "loss_sum": loss_sum}


class CheckpointClock:
    """When to checkpoint within an epoch: every ``steps`` optimiser steps of the run and/or every ``minutes`` of
    wall time (None or 0: only at epoch ends). Rank 0's clock decides for every rank."""

    def __init__(self, minutes: Optional[float], steps: Optional[int]) -> None:
        self.seconds = minutes * 60 if minutes else None
        self.steps = steps or None
        self.last = time.monotonic()

    def due(self, global_step: int) -> bool:
        """Whether to checkpoint after ``global_step`` steps of the whole run."""
        if self.steps is not None and global_step % self.steps == 0:
            return True
        if self.seconds is None:
            return False
        return distributed.on_main(lambda: time.monotonic() - self.last >= self.seconds)

    def reset(self) -> None:
        self.last = time.monotonic()


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
    checkpoint_every_minutes: Optional[float] = None,
    checkpoint_every_steps: Optional[int] = None,
    on_epoch: Optional[Callable[[EpochRecord], None]] = None,
) -> TrainResult:
    """Train ``model`` on ``images``: a uint8 tensor in memory, sliced per batch, or images on disk (an image folder)
    that ``num_workers`` DataLoader workers decode batch by batch, in the same seeded order. ``on_epoch``, if given,
    is called on rank 0 after each epoch this call trains, once its checkpoint is written (the epochs a resumed run
    finished before are in ``epoch_losses`` only); the other ranks wait for it at their next step."""
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
    run = {"pretext": recipe.name, "seed": seed, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch}
    result = TrainResult(batch_per_process=local_batch)
    first_step, carried_loss = 0, torch.zeros(())
    if checkpoint.is_file():
        resumed = load_checkpoint(checkpoint, run, model, optimizer, scheduler, scaler)
        result.epoch_losses = resumed["epoch_losses"]
        result.resumed_at_epoch, result.resumed_at_step = len(result.epoch_losses), resumed["step"]
        first_step, carried_loss = resumed["step"], resumed["loss_sum"]
        log.info(
            "resuming %s from checkpoint %s after epoch %d step %d",
            recipe.name,
            checkpoint,
            result.resumed_at_epoch,
            result.resumed_at_step,
        )
    loss_of = distributed.prepare_training(model, device, type(model).sync_batchnorm)
    model.train()
    clock = CheckpointClock(checkpoint_every_minutes, checkpoint_every_steps)

    def save(step: int, loss_sum: torch.Tensor) -> None:
        """Checkpoint after ``step`` steps of the current epoch (0: at its end, ``epoch_losses`` holding it)."""
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            **rng_states(),
            "epoch_losses": result.epoch_losses,
            "run": run,
            "step": step,
            "loss_sum": distributed.average(loss_sum).cpu() if step else 0.0,
        }
        if distributed.is_main():
            save_checkpoint(checkpoint, state)
        clock.reset()

    with image_progress(enabled=distributed.is_main()) as progress:
        for epoch in range(result.resumed_at_epoch, recipe.epochs):
            task = progress.add_task(
                f"{recipe.name} epoch {epoch + 1}/{recipe.epochs}", total=steps_per_epoch * batch_size, status=""
            )
            progress.advance(task, first_step * batch_size)
            started = time.perf_counter()
            if first_step == 0:  # mid-epoch, the checkpoint's RNG state carries on the epoch's stream
                distributed.reseed_augmentations(seed, epoch)
            order = distributed.local_order(epoch_order(len(images), seed, epoch))
            loss_sum = carried_loss.to(device)
            batches = uint8_batches(
                images,
                local_batch,
                device.type == "cuda",
                num_workers,
                order[first_step * local_batch : steps_per_epoch * local_batch],
            )
            for step, batch in zip(range(first_step, steps_per_epoch), batches):
                index = order[step * local_batch : (step + 1) * local_batch]
                batch = batch.to(device, non_blocking=True).float().div_(255)
                with autocast(device, dtype):
                    loss = loss_of(batch, labels[index].to(device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach()
                due = step < steps_per_epoch - 1 and clock.due(epoch * steps_per_epoch + step + 1)
                if due or step % 20 == 19 or step == steps_per_epoch - 1:  # no checkpoint of diverged weights
                    running = float(distributed.average(loss_sum)) / (step + 1)
                    if not math.isfinite(running):
                        raise UserError(
                            f"pretraining {recipe.name} diverged: loss is {running} at epoch {epoch + 1} step "
                            f"{step + 1}; "
                            f"the last good checkpoint is kept at '{checkpoint}'; lower pretext.lr"
                        )
                    progress.update(task, status=f"loss {running:.4f}")
                progress.advance(task, batch_size)
                if due:
                    save(step + 1, loss_sum)
            result.epoch_losses.append(float(distributed.average(loss_sum)) / steps_per_epoch)
            epoch_seconds = time.perf_counter() - started
            epoch_images = (steps_per_epoch - first_step) * batch_size
            result.seconds += epoch_seconds
            result.images_seen += epoch_images
            save(0, loss_sum)
            first_step, carried_loss = 0, torch.zeros(())
            record = EpochRecord(epoch + 1, result.epoch_losses[-1], epoch_images / epoch_seconds, epoch_seconds)
            log.info(
                "%s epoch %d/%d: loss %.4f, %.0f img/s, %.0f s",
                recipe.name,
                record.epoch,
                recipe.epochs,
                record.loss,
                record.images_per_second,
                record.seconds,
            )
            if on_epoch is not None and distributed.is_main():
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    on_epoch(record)
                model.train()
    return result
