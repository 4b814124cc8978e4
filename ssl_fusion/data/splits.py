"""The few-label protocol: a class-stratified, seeded subset of the training labels, or a published one read from a
file; its folds and validation parts."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

from ssl_fusion.runtime.checks import Checked, Rule, one_of, within
from ssl_fusion.runtime.errors import UserError

if TYPE_CHECKING:  # config.py imports this module
    from ssl_fusion.config import LabelsConfig

log = logging.getLogger("sslfuse")


def regime_name(fraction: Optional[float], per_class: Optional[int], indices_file: Optional[str] = None) -> str:
    """How a label regime is shown in tables: ``10/class``, ``1%`` or the name of its indices file."""
    if indices_file is not None:
        return Path(indices_file).name
    if per_class is not None:
        return f"{per_class}/class"
    return f"{fraction * 100:g}%"


def subset_fields(
    fraction: Optional[float],
    per_class: Optional[int],
    labeled: torch.Tensor,
    seed: int,
    train_labels: torch.Tensor,
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


def stratified_subset(
    labels: torch.Tensor, fraction: Optional[float], per_class: Optional[int], seed: int
) -> torch.Tensor:
    """Indices of a labeled subset with the same share (or count) of every class; sorted, seed-deterministic.

    With ``fraction`` each class keeps ``round(fraction * its size)`` samples, at least one.
    """
    return draw_per_class(labels, class_takes(labels, fraction, per_class), seed)


def class_takes(labels: torch.Tensor, fraction: Optional[float], per_class: Optional[int]) -> dict[int, int]:
    """How many samples of each class present (ascending) a stratified subset takes; a UserError for a regime out of
    range."""
    counts = torch.bincount(labels)
    present = counts[counts > 0]
    if per_class is not None:
        if per_class <= 0 or per_class > int(present.min()):
            raise UserError(
                f"labels.per_class must be in [1, {int(present.min())}] (the smallest class), got {per_class}"
            )
    elif fraction is None or not 0 < fraction <= 1:
        raise UserError(f"labels.fraction must be in (0, 1], got {fraction}")
    return {
        cls: per_class if per_class is not None else max(1, round(fraction * int(counts[cls])))
        for cls in torch.nonzero(counts).flatten().tolist()
    }


def draw_per_class(labels: torch.Tensor, takes: dict[int, int], seed: int) -> torch.Tensor:
    """Sorted indices of ``takes[c]`` samples of each class ``c``, drawn in class order from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls, take in takes.items():
        members = torch.nonzero(labels == cls).flatten()
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
        raise UserError(
            f"labels.indices_file '{path}': index {outside[0]} is outside the training split [0, {train_size})"
        )
    indices = torch.tensor(values)
    repeated = torch.unique(indices, return_counts=True)
    if int(repeated[1].max()) > 1:
        raise UserError(
            f"labels.indices_file '{path}': index {int(repeated[0][repeated[1] > 1][0])} is listed more than once"
        )
    return indices.sort().values


@functools.lru_cache(maxsize=None)
def warn_classes_without_labels(indices_file: str, missing: tuple[int, ...]) -> None:
    """Warn, once per file and not once per head and seed, of the classes an indices file labels no image of."""
    if missing:
        log.warning(
            "labels.indices_file '%s' labels no image of class(es) %s of the training split: the heads never "
            "predict them (results record classes_without_labels)",
            indices_file,
            list(missing),
        )


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


EVALUATION_SPLITS = ("test", "dev")


@dataclass
class EvaluationConfig(Checked):
    """The split a fuse scores: ``test``, the dataset's test split (for frozen choices), or ``dev``: a seeded,
    class-stratified part of the training split, ``dev_fraction`` of each class, drawn with ``dev_seed`` (not the label
    seed, so every label seed scores on the same images). The dev part is held out of every labeled subset, of the
    feature standardisation and of everything a head is selected or trained on: it plays the test split's role."""

    section: ClassVar[str] = "evaluation"
    split: str = "test"
    dev_fraction: float = 0.1
    dev_seed: int = 0  # its range is checked with the other seeds' (``config.check_seed``)

    def rules(self) -> dict[str, Rule]:
        return {"split": one_of(EVALUATION_SPLITS), "dev_fraction": within(0, 1, "()")}

    def dev_rows(self, train_labels: torch.Tensor) -> Optional[torch.Tensor]:
        """The sorted training indices of the dev part; None for ``split=test``."""
        return dev_part(train_labels, self.dev_fraction, self.dev_seed) if self.split == "dev" else None

    def labeled(self, labels_cfg: LabelsConfig, train_labels: torch.Tensor, seed: int) -> torch.Tensor:
        """The labeled training indices for ``seed``: the regime's subset (``split=test``: exactly as without this
        config), drawn outside the dev part for ``split=dev``."""
        dev = self.dev_rows(train_labels)
        if dev is None:
            return labels_cfg.subset(train_labels, seed)
        return labeled_outside(
            train_labels, dev, labels_cfg.fraction, labels_cfg.per_class, labels_cfg.indices_file, seed
        )

    def record(self, indices: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """The result fields of the evaluated images (``indices`` into their split, with their ``labels``): their
        number, ``evaluation_sha256``, and for ``split=dev`` how the dev part was drawn."""
        dev = {"dev_fraction": self.dev_fraction, "dev_seed": self.dev_seed} if self.split == "dev" else {}
        return {
            "evaluation_size": len(indices),
            "evaluation_sha256": evaluation_sha256(self.split, indices, labels),
            **dev,
        }


def complement(rows: torch.Tensor, size: int) -> torch.Tensor:
    """The sorted indices in ``[0, size)`` that ``rows`` does not hold."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[rows] = False
    return torch.nonzero(keep).flatten()


def dev_part(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """The sorted training indices of the dev part: ``round(fraction * class size)`` images of each class (at least
    one), seeded by ``seed``; a UserError when it would take every image of a class."""
    dev = stratified_subset(labels, fraction, None, seed)
    left = torch.bincount(labels[complement(dev, len(labels))], minlength=int(labels.max()) + 1)
    emptied = [c for c in torch.unique(labels).tolist() if left[c] == 0]
    if emptied:
        raise UserError(
            f"evaluation.dev_fraction={fraction} leaves class {emptied[0]} no training image outside the "
            "dev split; give a smaller evaluation.dev_fraction"
        )
    return dev


def labeled_outside(
    labels: torch.Tensor,
    dev: torch.Tensor,
    fraction: Optional[float],
    per_class: Optional[int],
    indices_file: Optional[str],
    seed: int,
) -> torch.Tensor:
    """``labeled_subset`` drawn from the training indices outside ``dev``: as many of each class as the regime labels
    on the whole training split (a fraction: at most what is left of the class), so that a dev result labels as many
    images as a test one; an indices file that lists a dev image is refused in one line."""
    if indices_file is None:
        rest = complement(dev, len(labels))
        left = torch.bincount(labels[rest])
        takes = (
            class_takes(labels[rest], None, per_class)
            if per_class is not None
            else {cls: min(take, int(left[cls])) for cls, take in class_takes(labels, fraction, None).items()}
        )
        return rest[draw_per_class(labels[rest], takes, seed)]
    indices = labeled_subset(labels, fraction, per_class, indices_file, seed)
    inside = indices[torch.isin(indices, dev)]
    if len(inside):
        raise UserError(
            f"labels.indices_file '{indices_file}': index {int(inside[0])} lies in the dev split "
            f"({len(inside)} of its indices do); with evaluation.split=dev label only images outside it, "
            "or use evaluation.split=test"
        )
    return indices


def evaluation_sha256(split: str, indices: torch.Tensor, labels: torch.Tensor) -> str:
    """A short hash of the evaluated images (their indices into their split, and their labels): two results with the
    same split and hash were scored on the same images, in the same order, so their predictions pair image by
    image."""
    digest = hashlib.sha256(split.encode())
    for values in (indices, labels):
        digest.update(values.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]
