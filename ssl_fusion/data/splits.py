"""The few-label protocol: a class-stratified, seeded subset of the training labels, or a published one read from a
file; its folds and validation parts."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ssl_fusion.runtime.errors import UserError

log = logging.getLogger("sslfuse")


def regime_name(fraction: Optional[float], per_class: Optional[int], indices_file: Optional[str] = None) -> str:
    """How a label regime is shown in tables: ``10/class``, ``1%`` or the name of its indices file."""
    if indices_file is not None:
        return Path(indices_file).name
    if per_class is not None:
        return f"{per_class}/class"
    return f"{fraction * 100:g}%"


def subset_fields(
    fraction: Optional[float], per_class: Optional[int], labeled: torch.Tensor, seed: int, train_labels: torch.Tensor,
    indices_file: Optional[str] = None,
) -> dict[str, Any]:
    """The fields of a result that name its labeled subset; equal ``labeled_indices_sha256``: the same images.
    ``classes_without_labels``: the training split's classes the subset has no label of (an indices file can leave
    some out; the heads then never predict them)."""
    by_file = indices_file is not None
    return {
        "regime": regime_name(fraction, per_class, indices_file),
        "labels_fraction": fraction if per_class is None and not by_file else None,
        "labels_per_class": None if by_file else per_class,
        "labels_indices_file": indices_file,
        "n_labeled": len(labeled),
        "labeled_indices_sha256": hashlib.sha256(labeled.numpy().tobytes()).hexdigest()[:16],
        "classes_without_labels": classes_without_labels(train_labels, labeled),
        "seed": seed,
    }


def classes_without_labels(train_labels: torch.Tensor, labeled: torch.Tensor) -> list[int]:
    """The classes of ``train_labels`` that none of the ``labeled`` indices has, ascending."""
    return sorted(set(torch.unique(train_labels).tolist()) - set(torch.unique(train_labels[labeled]).tolist()))


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
    """How many stratified folds ``labels`` can be cut into: ``folds``, fewer when a class has fewer labeled samples,
    0 when a class has a single one (nothing of it could be held out)."""
    counts = torch.bincount(labels)
    smallest = int(counts[counts > 0].min())
    return 0 if smallest < 2 else min(folds, smallest)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """The fold (0 .. k-1) of each sample, k = ``fold_count(labels, folds)``: each class spread evenly over the
    folds in a seeded random order, so every fold holds every class."""
    k = fold_count(labels, folds)
    if k == 0:
        raise ValueError("a class has a single labeled sample: no fold can hold it out")
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


def read_indices_file(path: str, train_size: int) -> torch.Tensor:
    """The sorted training indices listed in ``path``: one per line, or a JSON list (as published label splits are).
    A UserError naming the file when it is missing, not text, empty, not integers, out of range or repeats an index."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"labels.indices_file: no file '{path}'")
    try:
        text = file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise UserError(f"labels.indices_file '{path}': not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        values = json.loads(text) if text.startswith("[") else [int(line) for line in text.split()]
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
        raise UserError(f"labels.indices_file '{path}': not a JSON list or one integer index per line") from None
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"labels.indices_file '{path}': needs at least one index, each an integer")
    outside = [v for v in values if not 0 <= v < train_size]  # checked before torch.tensor, which overflows past int64
    if outside:
        raise UserError(f"labels.indices_file '{path}': index {outside[0]} is outside the training split "
                        f"[0, {train_size})")
    indices = torch.tensor(values)
    repeated = torch.unique(indices, return_counts=True)
    if int(repeated[1].max()) > 1:
        raise UserError(f"labels.indices_file '{path}': index {int(repeated[0][repeated[1] > 1][0])} is listed more than once")
    return indices.sort().values


@functools.lru_cache(maxsize=None)
def warn_classes_without_labels(indices_file: str, missing: tuple[int, ...]) -> None:
    """Warn, once per file and not once per head and seed, of the classes an indices file labels no image of."""
    if missing:
        log.warning("labels.indices_file '%s' labels no image of class(es) %s of the training split: the heads never "
                    "predict them (results record classes_without_labels)", indices_file, list(missing))


def labeled_subset(
    labels: torch.Tensor, fraction: Optional[float], per_class: Optional[int], indices_file: Optional[str], seed: int
) -> torch.Tensor:
    """The labeled training indices of a regime: those of ``indices_file`` when given (the seed then only seeds the
    heads), else the stratified, seeded subset."""
    if indices_file is not None:
        indices = read_indices_file(indices_file, len(labels))
        warn_classes_without_labels(indices_file, tuple(classes_without_labels(labels, indices)))
        return indices
    return stratified_subset(labels, fraction, per_class, seed)
