"""Training a fusion head on cached features held in memory: index batches, AdamW, cosine decay."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_fusion.fusion import FusionConfig, FusionHead


def standardize(train: list[torch.Tensor], *others: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Scale each pretext's features to zero mean, unit variance using statistics of ``train``."""
    stats = [(f.mean(0, keepdim=True), f.std(0, keepdim=True).clamp_min(1e-6)) for f in train]
    return [[(f - m) / s for f, (m, s) in zip(group, stats)] for group in (train, *others)]


def fit_head(head: FusionHead, features: list[torch.Tensor], labels: torch.Tensor, cfg: FusionConfig, seed: int) -> list[float]:
    """Minimise cross entropy (+ the head's regulariser) for ``cfg.steps`` steps; returns the loss curve."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    batch_size = min(cfg.batch_size, len(labels))
    losses = []
    head.train()
    for _ in range(cfg.steps):
        index = torch.randperm(len(labels), generator=generator)[:batch_size]
        loss = F.cross_entropy(head([f[index] for f in features]), labels[index]) + head.regularization()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    head.eval()
    return losses


@torch.no_grad()
def predict(head: FusionHead, features: list[torch.Tensor], batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predicted classes and, for heads that have them, per-sample pretext weights."""
    head.eval()
    predictions, weights = [], []
    for start in range(0, len(features[0]), batch_size):
        batch = [f[start : start + batch_size] for f in features]
        predictions.append(head(batch).argmax(1))
        batch_weights = head.pretext_weights(batch)
        if batch_weights is not None:
            weights.append(batch_weights)
    return torch.cat(predictions), torch.cat(weights) if weights else None
