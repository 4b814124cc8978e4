"""Data-parallel pretraining and caching under ``torchrun``: one process per device, rank 0 publishes.

``torchrun --nproc_per_node=N -m ssl_fusion.cli pretrain|cache ...`` starts N copies of the stage;
each joins one process group (NCCL on GPUs, gloo on the CPU). Every helper here is the identity
(or a no-op) when no process group is running, so a plain ``sslfuse`` call takes exactly the
single-process code path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Callable, ContextManager, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from ssl_fusion.runtime.errors import UserError

T = TypeVar("T")
STAGES = ("pretrain", "cache")  # the stages that split their work across torchrun's processes
# How long a rank waits at a collective for the others: rank 0 alone probes an encoder (kNN and linear probes after
# pretraining, on the whole labeled set under preset=full) while the other ranks wait at their next step or barrier;
# torch's default (10 minutes for NCCL) would end a run whose probe takes longer.
GROUP_TIMEOUT = timedelta(minutes=60)


def launched() -> bool:
    """Started by torchrun with more than one process (it sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def processes() -> int:
    """How many processes run this stage: the process group's size, or before it exists (when a stage reads its
    config) the number torchrun started; 1 without torchrun."""
    return world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def hydra_overrides() -> list[str]:
    """Extra Hydra overrides for ranks other than 0: no run folder of their own (they would each
    name one after their own start time), their log on stdout. Rank 0 keeps the user's run folder."""
    if not launched() or int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the duration of a stage; yields this rank's device.

    On GPUs each rank takes the GPU of its ``LOCAL_RANK`` and NCCL; on the CPU, gloo. Ranks other
    than 0 log warnings only. Without torchrun (or inside an existing group) nothing happens.
    """
    if not launched() or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=GROUP_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    if not is_main():
        logging.getLogger("sslfuse").setLevel(logging.WARNING)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_objects(value: T) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def on_main(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 only, its result sent to every rank: one decision for all."""
    return broadcast(compute() if is_main() else None)


def main_only(manager: ContextManager[T]) -> ContextManager[T | None]:
    """Enter ``manager`` on rank 0 only (a store lock, a staging folder); other ranks get None."""
    return manager if is_main() else contextlib.nullcontext()


def average(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (for logging losses); the tensor itself when not distributed."""
    if not is_distributed():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def gather(features: torch.Tensor) -> torch.Tensor:
    """Every rank's batch of ``features`` concatenated in rank order, with gradients flowing back to
    each rank's own part: a loss over the result sees the global batch as one big batch."""
    if not is_distributed():
        return features
    return torch.cat(dist_nn.all_gather(features), dim=0)


def shard_bounds(length: int, part: int | None = None) -> tuple[int, int]:
    """The contiguous block ``[start, stop)`` of ``length`` rows that rank ``part`` (default: this one) handles."""
    part = rank() if part is None else part
    return length * part // world_size(), length * (part + 1) // world_size()


def local_order(order: torch.Tensor) -> torch.Tensor:
    """This rank's share of an epoch's sample order, DistributedSampler-style (every world_size-th);
    step k of every rank together covers exactly the global batch k of the unsharded order."""
    return order[rank() :: world_size()]


def local_batch_size(batch_size: int) -> int:
    """The per-rank share of a global batch; the recipe's batch size stays the global one."""
    if batch_size % world_size():
        raise UserError(
            f"batch size {batch_size} does not split evenly over {world_size()} processes; "
            f"set train.batch_size to a multiple of {world_size()}, or train.batch_size_per_device instead"
        )
    return batch_size // world_size()


def reseed_augmentations(seed: int, epoch: int) -> None:
    """Under DDP, give each rank its own augmentation stream, derived from (seed, epoch, rank) so a
    resumed run draws what an uninterrupted one would. A single process keeps its one RNG stream."""
    if is_distributed():
        torch.manual_seed((seed * 100003 + epoch) * 4099 + rank())


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch on the CPU (gloo), from
    differentiable all-reduces of per-rank sums: ``nn.SyncBatchNorm`` refuses CPU tensors, and DDP
    refuses ``nn.SyncBatchNorm`` in a CPU module. Outside a process group it is plain BatchNorm."""

    @classmethod
    def sharing_state_of(cls, norm: nn.modules.batchnorm._BatchNorm) -> "GlooSyncBatchNorm":
        """A synced replacement holding the very parameters and buffers of ``norm`` (an optimizer keeps them)."""
        synced = cls(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(synced, key, getattr(norm, key))
        return synced.train(norm.training)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = torch.tensor([float(x.numel() // x.shape[1])])
        total = dist_nn.all_reduce(torch.cat([x.sum(dims), count]))
        count = total[-1]
        mean = total[:-1] / count
        shape = [1, -1, *[1] * (input.dim() - 2)]
        centred = x - mean.view(shape)
        var = dist_nn.all_reduce(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` (replaced in place, same parameters) computing its statistics over
    the global batch: ``nn.SyncBatchNorm`` on GPUs, ``GlooSyncBatchNorm`` on the CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, GlooSyncBatchNorm.sharing_state_of(child))
        else:
            sync_batchnorm(child, device)
    return model


class LossOf(nn.Module):
    """A pretext's ``loss`` as a module's ``forward``: DistributedDataParallel readies its gradient hooks in the
    wrapped module's forward, so the loss must be computed through it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss(images, labels)


def prepare_training(model: nn.Module, device: torch.device, sync_bn: bool) -> Callable[..., torch.Tensor]:
    """The loss function to train ``model`` with: its own ``loss`` in one process. Under torchrun: BatchNorm synced
    over the global batch when ``sync_bn`` (converted in place, so the state dict keeps its keys), and the loss
    computed through DistributedDataParallel, which starts every rank from rank 0's parameters and buffers and
    averages the gradients over ranks in buckets, each all-reduced as soon as the backward pass has filled it (on
    GPUs this overlaps the backward pass). The optimizer and checkpoints keep using ``model`` itself.

    Buffers are not broadcast at every step: synced BatchNorm keeps them equal, and otherwise rank 0's are those
    saved, as in one process."""
    if not is_distributed():
        return model.loss
    if sync_bn:
        sync_batchnorm(model, device)
    return nn.parallel.DistributedDataParallel(
        LossOf(model),
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )
