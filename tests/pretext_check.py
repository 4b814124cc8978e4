"""Shared checks for pretext tests: do a few steps lower the loss, does a short pretraining on real
images beat the untrained encoder, does a training step make the host wait for the device?"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_fusion.data.datasets import ImageData, load_dataset
from ssl_fusion.evaluation.probe import extract_features, knn_accuracy
from ssl_fusion.models.encoders import Encoder, SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig
from ssl_fusion.pretexts.trainer import train_pretext
from ssl_fusion.runtime.device import autocast, prepare_model, resolve_precision

CPU = torch.device("cpu")  # the short real-data pretrainings run in the precision `auto` picks here


def tiny_encoder(channels: int = 1) -> Encoder:
    return build_encoder(SmallCNNConfig(name="small_cnn", widths=[8, 16, 16, 32]), channels=channels)


def prototype_images(size: int = 16, n: int = 64, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy float copies of ``classes`` random prototypes, labelled by prototype; seeded."""
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.rand(classes, 1, size, size, generator=generator)
    labels = torch.arange(n) % classes
    return (prototypes[labels] + 0.1 * torch.rand(n, 1, size, size, generator=generator)).clamp(0, 1), labels


def assert_loss_falls(
    model: Pretext, images: torch.Tensor, labels: torch.Tensor, factor: float, steps: int = 40, bf16: bool = False
) -> None:
    """Adam on one fixed batch for ``steps`` steps: the mean of the last five losses is below ``factor`` times the
    mean of the first five. With ``bf16`` every step runs under bf16 autocast and must give a float32 scalar."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(images, labels)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < factor * sum(losses[:5]) / 5, losses


def spy_on_encoder_input(model: Pretext) -> list[torch.Tensor]:
    """Make ``model``'s encoder record each input it is given and return zero features; the list it records into."""
    seen: list[torch.Tensor] = []

    def spy(inputs: torch.Tensor) -> torch.Tensor:
        seen.append(inputs)
        return torch.zeros(len(inputs), model.encoder.out_dim)

    model.encoder.forward = spy
    return seen


def assert_bf16_loss_backpropagates(model: Pretext, shape: tuple[int, int, int]) -> None:
    """On random channels_last images of ``shape`` under bf16 autocast: a finite float32 scalar loss whose
    gradient reaches the encoder's first convolution."""
    model = model.to(memory_format=torch.channels_last)
    images = torch.rand(6, *shape).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(images, torch.zeros(6, dtype=torch.long))
    assert loss.dtype == torch.float32 and loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.backbone[0][0].weight.grad.abs().sum() > 0


def fashion_mnist_subset(n_train: int = 4000, n_test: int = 1000) -> ImageData:
    return load_dataset({"name": "fashion_mnist", "max_train": n_train, "max_test": n_test}, None)[1]


def knn_of(encoder, data: ImageData) -> float:
    device, dtype = CPU, resolve_precision("auto", CPU)
    bank = extract_features(encoder, data.train_images, 1024, device, dtype)
    queries = extract_features(encoder, data.test_images, 1024, device, dtype)
    return knn_accuracy(bank, data.train_labels, queries, data.test_labels, k=20, num_classes=data.num_classes)


def short_pretraining(
    recipe: PretextConfig, data: ImageData, checkpoint_dir: Path, seed: int = 0
) -> tuple[Pretext, Encoder, list[float]]:
    """The pretext model after pretraining with ``recipe`` on ``data``, a copy of its encoder from before, and the
    epoch losses."""
    torch.manual_seed(seed)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn"), data.channels)
    encoder.set_statistics(data.train_images)
    untrained = copy.deepcopy(encoder)
    pretext_cls = PRETEXTS.get(recipe.name).impl
    recipe = pretext_cls.adapt(recipe, data)
    model = pretext_cls(recipe, encoder).to(memory_format=torch.channels_last)
    result = train_pretext(
        model,
        data.train_images,
        data.train_labels,
        recipe,
        CPU,
        resolve_precision("auto", CPU),
        seed,
        checkpoint_dir / "ckpt.pt",
    )
    return model, untrained, result.epoch_losses


def short_pretraining_knn(
    recipe: PretextConfig, data: ImageData, checkpoint_dir: Path, seed: int = 0
) -> tuple[float, float, list[float]]:
    """kNN accuracy after pretraining with ``recipe`` on ``data``, of the same encoder before it, and the epoch
    losses."""
    model, untrained, losses = short_pretraining(recipe, data, checkpoint_dir, seed)
    return knn_of(model.encoder, data), knn_of(untrained, data), losses


def assert_beats_untrained(recipe: PretextConfig, checkpoint_dir: Path, margin: float) -> None:
    """A short pretraining with ``recipe`` on 4,000 Fashion-MNIST images lowers its epoch loss and raises kNN accuracy
    (1,000 test images) by more than ``margin`` over the same encoder untrained."""
    trained, untrained, losses = short_pretraining_knn(recipe, fashion_mnist_subset(4000, 1000), checkpoint_dir)
    assert losses[-1] < losses[0], losses
    assert trained > untrained + margin, (trained, untrained)


aten = torch.ops.aten
# Ops whose result the host must read from the device before going on: a scalar, or an output size that depends on
# the values (``x[mask]``, ``nonzero``).
SYNCING_OPS = {
    aten._local_scalar_dense,  # .item(), float(t), bool(t), ``if t.any():``
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# torch.tensor(<numbers>), copied to the device on a GPU; but not a 0-dim one, which is also how a Python number
# assigned to a slice arrives (a GPU fills the slice with it, no copy).
HOST_VALUES = {aten.lift_fresh, aten.lift_fresh_copy}


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device on a GPU (a copy from the device, an output whose size
    depends on values) or copy host values to it, as they run on any device (the CPU included): boolean-mask
    indexing, ``.item()`` and its kin, tensors made from Python numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        masks = packet in INDEX_OPS and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in (args[1] or ())
        )
        host_values = packet in HOST_VALUES and args[0].dim() > 0
        if packet in SYNCING_OPS or host_values or masks:
            self.found.append(f"{func}{' (boolean mask)' if masks else ''}")
        return func(*args, **(kwargs or {}))


def training_step(
    model: Pretext, images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> Callable[[ContextManager], None]:
    """One step as the trainer makes it (autocast in the precision ``auto`` picks, loss, backward, AdamW step) on
    ``device``, to run repeatedly; the pretext's part (loss and backward) inside the context manager it is given."""
    model = prepare_model(model.train(), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = images.to(device), labels.to(device)
    dtype = resolve_precision("auto", device)

    def step(watch: ContextManager) -> None:
        optimizer.zero_grad(set_to_none=True)
        with watch:
            with autocast(device, dtype):
                loss = model.loss(images, labels)
            loss.backward()
        optimizer.step()

    return step


def host_syncs_of_step(model: Pretext, images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """The ops of the pretext's part of a CPU training step that would make the host wait on a GPU (``HostSyncs``),
    after a first step (which may put constants on the device once). The optimizer's step is left out: it reads
    its step counts with ``.item()``, from tensors that stay on the CPU beside a GPU's parameters."""
    step = training_step(model, images, labels, CPU)
    step(contextlib.nullcontext())
    syncs = HostSyncs()
    step(syncs)
    return syncs.found


def assert_cuda_step_makes_no_host_sync(model: Pretext, images: torch.Tensor, labels: torch.Tensor) -> None:
    """A training step on the GPU after a first one, under ``torch.cuda.set_sync_debug_mode("error")``: torch raises
    on any call that makes the host wait for the device."""
    step = training_step(model, images, labels, torch.device("cuda"))
    step(contextlib.nullcontext())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(contextlib.nullcontext())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
