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


def fold_count(labels: torch.Tensor, folds: int) -> int:
    """How many stratified folds ``labels`` can be cut into: ``folds``, fewer when a class has fewer labeled samples.
    A UserError when a class has a single one: nothing of it could be held out."""
    smallest = int(torch.bincount(labels)[torch.bincount(labels) > 0].min())
    if smallest < 2:
        raise UserError(
            f"labels: a class has only {smallest} labeled image, and cross-validated selection must hold one out; "
            "give labels.per_class >= 2 (or a larger labels.fraction)"
        )
    return min(folds, smallest)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """The fold (0 .. k-1) of each sample, k = ``fold_count(labels, folds)``: each class spread evenly over the
    folds in a seeded random order, so every fold holds every class."""
    k = fold_count(labels, folds)
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    offset = 0
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)]
        fold_of[shuffled] = (torch.arange(len(members)) + offset) % k
        offset += len(members)
    return fold_of


def split_validation(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into ``labels``) of a stratified validation part and of the rest."""
    val = stratified_subset(labels, fraction, None, seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val
