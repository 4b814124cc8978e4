"""The few-label protocol: a class-stratified, seeded subset of the training labels."""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch

from ssl_fusion.runtime.errors import UserError


def regime_name(fraction: Optional[float], per_class: Optional[int]) -> str:
    """How a label regime is shown in tables: ``10/class`` or ``1%``."""
    if per_class is not None:
        return f"{per_class}/class"
    return f"{fraction * 100:g}%"


def subset_fields(fraction: Optional[float], per_class: Optional[int], labeled: torch.Tensor, seed: int) -> dict[str, Any]:
    """The fields of a result that name its labeled subset; equal ``labeled_indices_sha256``: the same images."""
    return {
        "regime": regime_name(fraction, per_class),
        "labels_fraction": fraction if per_class is None else None,
        "labels_per_class": per_class,
        "n_labeled": len(labeled),
        "labeled_indices_sha256": hashlib.sha256(labeled.numpy().tobytes()).hexdigest()[:16],
        "seed": seed,
    }


def stratified_subset(labels: torch.Tensor, fraction: Optional[float], per_class: Optional[int], seed: int) -> torch.Tensor:
    """Indices of a labeled subset with the same share (or count) of every class; sorted, seed-deterministic.

    With ``fraction`` each class keeps ``round(fraction * its size)`` samples, at least one.
    """
    counts = torch.bincount(labels)
    present = counts[counts > 0]
    if per_class is not None:
        if per_class <= 0 or per_class > int(present.min()):
            raise UserError(f"labels.per_class must be in [1, {int(present.min())}] (the smallest class), got {per_class}")
    elif fraction is None or not 0 < fraction <= 1:
        raise UserError(f"labels.fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in torch.nonzero(counts).flatten().tolist():
        members = torch.nonzero(labels == cls).flatten()
        take = per_class if per_class is not None else max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values
