"""Feature extraction with a frozen encoder, and the probes on features (kNN: weighted cosine vote; linear: L2
logistic regression), computed on the device the features are on."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ssl_fusion.data.batches import Images, uint8_batches
from ssl_fusion.data.datasets import sample_indices
from ssl_fusion.models.encoders import Encoder
from ssl_fusion.runtime.device import autocast


@torch.inference_mode()
def encode_batches(
    encoder: Encoder,
    images: Images,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    on_batch: Callable[[int, torch.Tensor], None],
    transform: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    encoder_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    num_workers: Optional[int] = 0,
    keep_on_device: bool = False,
) -> None:
    """Run the frozen encoder over uint8 images in batches; ``on_batch(start, features)`` gets each result.
    ``transform(start, batch)``, if given, changes each batch (floats in [0, 1], on ``device``) before encoding;
    ``encoder_input(batch)``, if given, then turns it into what the encoder was trained on (a pretext's
    ``encoder_input``). Images on disk (a dataset) are decoded by ``num_workers`` DataLoader workers (None: as many
    as ``auto_workers``). The features are fp32, in host memory unless ``keep_on_device``."""
    encoder.eval()
    start = 0
    for batch in uint8_batches(images, batch_size, device.type == "cuda", num_workers):
        size = len(batch)
        batch = batch.to(device, non_blocking=True).float().div_(255)
        if transform is not None:
            batch = transform(start, batch)
        if encoder_input is not None:
            batch = encoder_input(batch)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            features = encoder(batch)
        on_batch(start, features.float() if keep_on_device else features.float().cpu())
        start += size


def extract_features(
    encoder: Encoder,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    encoder_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    keep_on_device: bool = False,
) -> torch.Tensor:
    """The encoder's features of ``images``, on ``device`` when ``keep_on_device`` (for probes computed there), else
    in host memory."""
    out = torch.empty(len(images), encoder.out_dim, device=device if keep_on_device else "cpu")

    def keep(start: int, features: torch.Tensor) -> None:
        out[start : start + len(features)] = features

    encode_batches(
        encoder, images, batch_size, device, dtype, keep, encoder_input=encoder_input, keep_on_device=keep_on_device
    )
    return out


PROBE_SEED = 0  # the probes of every encoder see the same images


def probe_subset(
    images: torch.Tensor, labels: torch.Tensor, limit: Optional[int], seed: int = PROBE_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels a probe uses: a seeded random sample of ``limit`` of them (all when ``limit`` is None or
    not below their number), drawn over the whole split so that every class is in it even where the split is stored
    sorted by class."""
    keep = sample_indices(len(labels), limit, seed)
    return images[keep], labels[keep]


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
) -> float:
    """Top-1 accuracy of a k-nearest-neighbour vote on cosine similarity, weighted by exp(sim / T), computed on the
    device of ``train_features`` (the labels are moved there), with one host sync at the end."""
    device = train_features.device
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(test_features), 1024):
        queries = F.normalize(test_features[start : start + 1024].to(device).float(), dim=1)
        similarity, neighbours = (queries @ bank.t()).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes, device=device)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start : start + 1024]).sum()
    return int(correct) / len(test_features)


def cross_validated_knn(features: torch.Tensor, labels: torch.Tensor, k: int, folds: int, seed: int) -> float:
    """Mean accuracy of a kNN vote over ``folds`` folds of the labeled set."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    accuracies = []
    for fold in order.chunk(folds):
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[fold] = False
        accuracies.append(knn_accuracy(features[keep], labels[keep], features[fold], labels[fold], k=k))
    return sum(accuracies) / len(accuracies)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    l2: float = 1e-3,
    steps: int = 100,
) -> float:
    """Top-1 accuracy of an L2-regularised multinomial logistic regression on standardised features (L-BFGS), fitted
    on the device of ``train_features`` (the labels are moved there)."""
    device = train_features.device
    train_labels, test_labels, test_features = train_labels.to(device), test_labels.to(device), test_features.to(device)
    mean, std = train_features.mean(0, keepdim=True), train_features.std(0, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = torch.zeros(train_x.shape[1], num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(1) == test_labels).float().mean())
