"""The result contract: what one evaluation of a method records, written as ``results.json`` and read by the report.

A ``FuseResult`` keeps apart what the method is (``family``, ``options``, ``pretexts``, ``cached_views``), what it
ran on (dataset and pretraining data, with their fingerprints, encoder and encoder seed; ``classes``, the names of
the class indices), which labels it used (``labels``: the fields of the labeled subset, open to new keys), whether it
may be ranked (``uses_test``, ``uses_all_labels``), its scores on the evaluation ``split`` (``metrics``), how its
settings were chosen (``selection``), and anything else (``details``). ``method`` and ``title`` are labels for
people: the report groups and decides on the fields, never on a label.

``results.json`` is one flat JSON object: the scalar fields, ``options`` as an object, and the keys of ``labels``,
``metrics``, ``selection``, ``evaluation`` and ``details`` side by side, so that ``results.csv`` is one row of the
same keys. The evaluation split's predictions (``predictions``) are not in it: the stages write them beside it
(``predictions.npz``, named by ``predictions_file``), and ``evaluation_sha256`` says which images they are of.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

RESULT_VERSION = 2  # 1: results without the fields below (before the contract); the report refuses them
SELECTION_KEYS = (
    "selected_l2",
    "selected_group",  # the group penalty's strength (fusion=group_lasso)
    "selected_steps",
    "selected_c",
    "cv_accuracy",
    "cv_nll",
    "val_accuracy",
    "folds",
    "selection",
)
LABEL_KEYS = (
    "regime",
    "labels_fraction",
    "labels_per_class",
    "labels_indices_file",
    "n_labeled",
    "labeled_indices_sha256",
    "seed",
)
# the evaluated images (``data.splits.evaluation_sha256``), how a dev split was drawn, the predictions' file
EVALUATION_KEYS = ("evaluation_size", "evaluation_sha256", "dev_fraction", "dev_seed", "predictions_file")
GROUPS = ("labels", "metrics", "selection", "evaluation", "details")
PREDICTIONS_FILE = "predictions.npz"
CONTEXT_KEYS = (
    "dataset",
    "pretraining_dataset",
    "encoder",
    "encoder_seed",
    "data_fingerprint",
    "pretraining_fingerprint",
)


@functools.lru_cache(maxsize=1)
def code_commit() -> Optional[str]:
    """The git commit of the sslfuse checkout this process runs, with ``-dirty`` when its files differ from it (an
    untracked file the checkout does not ignore counts); None when the package is not a git checkout (installed, or
    git missing). Asked once per process."""
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package.parent), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package.parent:  # a venv inside another repository
            return None
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass(frozen=True)
class Predictions:
    """The evaluation split's predicted class indices and true ones, in the split's order (as ``evaluation_sha256``
    hashes it), kept beside ``results.json`` so that two results on the same images pair image by image."""

    predicted: np.ndarray
    labels: np.ndarray

    def to_bytes(self) -> bytes:
        """The ``.npz`` file: both arrays as int16 (int32 past 32767 classes)."""
        largest = max(int(self.predicted.max(initial=0)), int(self.labels.max(initial=0)))
        kind = np.int16 if largest <= np.iinfo(np.int16).max else np.int32
        buffer = io.BytesIO()
        np.savez(buffer, predicted=self.predicted.astype(kind), labels=self.labels.astype(kind))
        return buffer.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> Predictions:
        """The predictions ``to_bytes`` wrote to ``path``; OSError or ValueError when it holds no such arrays."""
        with np.load(path, allow_pickle=False) as arrays:
            if set(arrays.files) != {"predicted", "labels"}:
                raise ValueError(f"holds {sorted(arrays.files)}, not the arrays predicted and labels")
            predicted, labels = arrays["predicted"], arrays["labels"]
        integers = predicted.dtype.kind == labels.dtype.kind == "i"
        if predicted.ndim != 1 or predicted.shape != labels.shape or not integers:
            raise ValueError(f"holds arrays of shapes {predicted.shape} and {labels.shape}, not two integer vectors")
        return cls(predicted, labels)


def titled(name: str, options: dict[str, Any]) -> str:
    """``name[key=value,...]``: a method's name with the options it was given, as tables show it."""
    return name + (f"[{','.join(f'{key}={value}' for key, value in options.items())}]" if options else "")


@dataclass
class FuseResult:
    method: str  # for people: ``attention[combine=concat](rotation+simclr)``
    title: str  # for people, and what ``--reference`` names: the method without its inputs, ``select[by=val]``
    family: str  # the registered method: ``attention``, ``select``, ``single``, ``supervised_scratch``, ...
    options: dict[str, Any]  # the family's options that differ from its ``conf/fusion/<family>.yaml``
    pretexts: list[str]
    labels: dict[str, Any]  # the labeled subset (``data.splits.subset_fields``): regime, seed, n_labeled, ...
    metrics: dict[str, float]  # on ``split``, each key prefixed by it: ``test_accuracy``, ``test_nll``, ...
    selection: dict[str, Any] = field(default_factory=dict)  # settings chosen on the labeled set, and how
    split: str = "test"
    uses_test: bool = False  # used the evaluation split's labels to choose (an oracle: a reference, never a pick)
    uses_all_labels: bool = False  # reads an encoder trained with every training label
    cached_views: int = 0  # augmented views of the labeled images the head also trained on
    classes: list[str] = field(default_factory=list)  # the class names, by class index (``class_names``)
    dataset: Optional[str] = None  # None: not run by a stage (``fuse_arrays``)
    pretraining_dataset: Optional[str] = None
    encoder: Optional[str] = None
    encoder_seed: Optional[int] = None
    data_fingerprint: Optional[str] = None  # the downstream data's train and test splits
    pretraining_fingerprint: Optional[str] = None  # the images sslfuse's own encoders are pretrained on
    commit: Optional[str] = field(default_factory=code_commit)  # the code that made it (``code_commit``)
    evaluation: dict[str, Any] = field(default_factory=dict)  # EVALUATION_KEYS: the images ``metrics`` are on
    details: dict[str, Any] = field(default_factory=dict)  # timings, losses, screen, pretext weights, config, ...
    # not in the record: the stages write them beside it (``predictions_file``)
    predictions: Optional[Predictions] = field(default=None, repr=False, compare=False)

    @property
    def accuracy(self) -> float:
        return self.metrics[f"{self.split}_accuracy"]

    def in_context(self, context: dict[str, Any]) -> FuseResult:
        """This result with the stage's context fields (``CONTEXT_KEYS``) set."""
        return dataclasses.replace(self, **context)

    def to_record(self) -> dict[str, Any]:
        """The flat JSON object of ``results.json`` (see the module's docstring)."""
        scalars = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in (*GROUPS, "predictions")
        }
        record = {"result_version": RESULT_VERSION, **scalars}
        for group in GROUPS:
            clash = set(getattr(self, group)) & set(record)
            if clash:
                raise ValueError(f"result {group} key(s) {sorted(clash)} clash with other fields")
            record |= getattr(self, group)
        return record

    @classmethod
    def from_record(cls, record: Any) -> FuseResult:
        """The result a ``results.json`` object holds; a ValueError saying what is wrong with it (the caller names
        the file). Keys this version does not know are kept in ``details``."""
        if not isinstance(record, dict):
            raise ValueError(f"not a JSON object but {type(record).__name__}")
        version = record.get("result_version")
        if version != RESULT_VERSION:
            raise ValueError(
                f"result_version is {version!r}, this sslfuse reads {RESULT_VERSION} (written by another "
                "sslfuse: run its fuse again)"
            )
        split = check_type(record, "split", str)
        metrics = {k: v for k, v in record.items() if k.startswith(f"{split}_") and k not in EVALUATION_KEYS}
        check_type(metrics, f"{split}_accuracy", (int, float))
        scalars = {f.name for f in dataclasses.fields(cls)} - {*GROUPS, "predictions"}
        for name, kind in (
            ("method", str),
            ("title", str),
            ("family", str),
            ("options", dict),
            ("pretexts", list),
            ("uses_test", bool),
            ("uses_all_labels", bool),
            ("cached_views", int),
            ("regime", str),
            ("seed", int),
        ):
            check_type(record, name, kind)
        if not all(isinstance(p, str) for p in record["pretexts"]):
            raise ValueError("field 'pretexts' must be a list of names")
        taken = scalars | set(metrics) | {"result_version"}
        return cls(
            **{name: record.get(name) for name in scalars - {"classes"}},
            classes=recorded_classes(record),
            labels={k: record[k] for k in LABEL_KEYS if k in record},
            metrics=metrics,
            selection={k: record[k] for k in SELECTION_KEYS if k in record},
            evaluation={k: record[k] for k in EVALUATION_KEYS if k in record},
            details={
                k: v
                for k, v in record.items()
                if k not in taken | set(LABEL_KEYS) | set(SELECTION_KEYS) | set(EVALUATION_KEYS)
            },
        )


def class_names(classes: Optional[list[str]], count: int) -> list[str]:
    """Names for class indices 0..``count``-1 and any further ones ``classes`` (a dataset's) names: the index as text
    where ``classes`` has no name for it."""
    given = list(classes or [])
    return given + [str(index) for index in range(len(given), count)]


def recorded_classes(record: dict[str, Any]) -> list[str]:
    """The class names of a record; a record written before they were kept lists the class indices (or nothing),
    which read as names of themselves."""
    classes = record.get("classes") or []
    if not isinstance(classes, list):
        raise ValueError(f"field 'classes' must be a list of names, got {classes!r}")
    return [str(name) for name in classes]


def check_type(record: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``record[name]``, or a ValueError when it is missing or not of ``kind`` (a bool is no number)."""
    if name not in record:
        raise ValueError(f"field '{name}' is missing")
    value = record[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"field '{name}' must be {getattr(kind, '__name__', 'a number')}, got {value!r}")
    return value
