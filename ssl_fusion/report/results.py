"""The results a report reads: every ``results.json`` under a folder, checked, each counted once, as one frame.

Results are averaged only within one context (``CONTEXT``): the same dataset, encoder and encoder seed, where the
dataset is told apart by its fingerprints, so that two synthetic settings, two image folders or two pretraining
datasets behind one name never share a row (their tables are headed with the fingerprints). A method is its
``VARIANT`` fields and its pretexts; its ``method`` label is only shown. Results scored on different splits (``test``,
``dev``) are never tabled together: ``scored_on`` takes one split's. Each row keeps its folder (``result_dir``), from
which ``load_predictions`` reads the evaluation split's predictions where the result kept them.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ssl_fusion.evaluation.result import FuseResult, Predictions
from ssl_fusion.runtime.errors import UserError

log = logging.getLogger("sslfuse")

# what results must share to be averaged, besides the method, regime and pretexts
CONTEXT = ("dataset", "encoder", "encoder_seed")
UNRECORDED = "unrecorded"  # a result run outside a stage (``fuse_arrays``) has no encoder seed: one group
VARIANT = ("family", "options_key", "cached_views")  # what a method is, besides its pretexts
FLAGS = ("uses_test", "uses_all_labels")  # rows that cannot be best
FINGERPRINT_DIGITS = 8
SPLITS = ("test", "dev")  # the order the report shows the evaluation splits in; never pooled
METRICS = ("accuracy", "macro_f1", "nll")  # recorded as ``<split>_<metric>``


def load_result(path: Path) -> FuseResult:
    """The result in ``path``; a UserError naming the file when it cannot be read as one."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"report: cannot read '{path}': {err}") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"report: '{path}' is not JSON ({err.msg}, line {err.lineno}); delete it or run its fuse again"
        ) from None
    try:
        return FuseResult.from_record(record)
    except ValueError as err:
        raise UserError(f"report: '{path}' is not a result: {err}") from None


def unique_results(paths: list[Path]) -> list[tuple[Path, FuseResult]]:
    """The results of ``paths``, each with its file, a result found more than once (a copied ``results.json``)
    counted once, with a warning naming both files."""
    first: dict[str, Path] = {}
    results = []
    for path in paths:
        result = load_result(path)
        content = json.dumps(result.to_record(), sort_keys=True, default=str)
        if content in first:
            log.warning("report: '%s' holds the same result as '%s'; counted once", path, first[content])
            continue
        first[content] = path
        results.append((path, result))
    return results


def collect_results(folder: Path) -> pd.DataFrame:
    """Every result under ``folder``, each once (``unique_results``), as ``results_frame``."""
    if not folder.is_dir():
        raise UserError(f"report: '{folder}' is not a folder")
    paths = sorted(folder.rglob("results.json"))
    if not paths:
        raise UserError(f"report: no results.json under '{folder}'")
    found = unique_results(paths)
    return results_frame([result for _, result in found], [str(path.parent) for path, _ in found])


def results_frame(results: list[FuseResult], folders: Optional[list[str]] = None) -> pd.DataFrame:
    """One row per result: its record's fields, ``result_dir`` (its folder, of ``folders``; None when not given),
    ``pretext_set`` (sorted, joined by ``+``), ``options_key`` (the options as canonical JSON), the context as text
    (``dataset`` named with its fingerprints where the name alone does not tell the data apart, a missing encoder seed
    as ``unrecorded``)."""
    frame = pd.DataFrame([result.to_record() for result in results])
    frame["result_dir"] = folders or None
    frame["evaluated_on"] = evaluated_on(frame)
    frame["pretext_set"] = frame["pretexts"].map(lambda names: "+".join(sorted(names)))
    frame["options_key"] = frame["options"].map(lambda options: json.dumps(options, sort_keys=True, default=str))
    frame["dataset_name"] = frame["dataset"]  # as configured; ``dataset`` becomes the label tables show
    frame["dataset"] = dataset_labels(frame)
    for column in CONTEXT:
        frame[column] = frame[column].astype(object).map(context_value)
    return frame


def dataset_labels(frame: pd.DataFrame) -> list[str]:
    """Each row's dataset name, with its data and pretraining fingerprints when another row has the same name
    on other data: ``synthetic (data 1a2b3c4d, pretrained on synthetic 5e6f7a8b)``; the fingerprints in full should
    their first digits coincide."""
    data = list(
        zip(
            *(
                frame[c].map(context_value)
                for c in ("dataset", "data_fingerprint", "pretraining_dataset", "pretraining_fingerprint")
            )
        )
    )
    kinds = Counter(name for name, *_ in set(data))
    ambiguous = {name for name, count in kinds.items() if count > 1}
    for digits in (FINGERPRINT_DIGITS, None):
        labels = [
            name
            if name not in ambiguous
            else f"{name} (data {fingerprint[:digits]}, pretrained on {pretraining} {pretrained[:digits]})"
            for name, fingerprint, pretraining, pretrained in data
        ]
        if len(set(labels)) == len(set(data)):
            return labels
    return labels


def context_value(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return UNRECORDED
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def contexts(stats: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The (dataset, encoder, encoder seed) combinations present, sorted."""
    return sorted(set(zip(*(stats[c] for c in CONTEXT))))


def context_heading(context: tuple[str, str, str]) -> str:
    dataset, encoder, encoder_seed = context
    return f"dataset {dataset}, encoder {encoder}, encoder seed {encoder_seed}"


def regime_order(regime: str) -> tuple[int, float, str]:
    """Per-class regimes first, then fractions, each ascending, then published splits (an indices file's name)."""
    kind = 0 if regime.endswith("/class") else 1 if regime.endswith("%") else 2
    try:
        size = float(regime.removesuffix("/class").removesuffix("%")) if kind < 2 else 0.0
    except ValueError:
        kind, size = 2, 0.0
    return kind, size, regime


def by_regime(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in ``regime_order``, each regime's rows in their order."""
    if table.empty:
        return table
    return table.sort_values("regime", key=lambda regimes: regimes.map(regime_order), kind="stable").reset_index(
        drop=True
    )


def evaluated_on(frame: pd.DataFrame) -> list[str]:
    """Each result's evaluation split as the report keeps splits apart: ``test``, ``dev``; where dev results were drawn
    with more than one dev fraction or dev seed (other dev images), each draw apart: ``dev[fraction=0.2,seed=1]``."""
    missing = pd.Series(None, index=frame.index, dtype=object)
    fractions, seeds = frame.get("dev_fraction", missing), frame.get("dev_seed", missing)
    is_dev = frame["split"].eq("dev")
    several = len(set(zip(fractions[is_dev], seeds[is_dev]))) > 1
    return [
        f"dev[fraction={fraction:g},seed={int(seed)}]" if split == "dev" and several else split
        for split, fraction, seed in zip(frame["split"], fractions, seeds)
    ]


def splits_of(results: pd.DataFrame) -> list[str]:
    """The evaluation splits of ``results`` (``evaluated_on``): ``test``, then the dev ones, then any other."""
    present = set(results["evaluated_on"])
    order = {split: rank for rank, split in enumerate(SPLITS)}
    return sorted(present, key=lambda name: (order.get(name.split("[")[0], len(SPLITS)), name))


def scored_on(results: pd.DataFrame, name: str) -> pd.DataFrame:
    """The results evaluated on ``name`` (``evaluated_on``), with their split's metrics also under the ``test_*`` names
    the tables and the paired differences read: a dev result is tabled as a test one is, but only ever beside
    results on the same dev images."""
    part = results[results["evaluated_on"] == name].reset_index(drop=True)
    split = part["split"].iloc[0]
    if split == "test":
        return part
    return part.assign(
        **{f"test_{metric}": part[f"{split}_{metric}"] for metric in METRICS if f"{split}_{metric}" in part}
    )


def correctness(results: pd.DataFrame) -> list[Optional[np.ndarray]]:
    """Per result, 1/0 per evaluated image (right or wrong, in the split's order) where it kept its predictions; None
    elsewhere, and for every result of a dataset whose results were not all scored on the same images."""
    if "evaluation_sha256" not in results:
        return [None] * len(results)
    consistent = results.groupby("dataset")["evaluation_sha256"].transform(lambda hashes: hashes.nunique() <= 1)
    kept = [kept_predictions(row) if same else None for same, (_, row) in zip(consistent, results.iterrows())]
    return [None if k is None else (k.predicted == k.labels).astype(np.int8) for k in kept]


def load_predictions(row: pd.Series) -> Optional[np.ndarray]:
    """The predicted class indices of a result (a row of ``collect_results``) on its evaluation split, in the order of
    the split's images; None when the result kept none (from before predictions were kept, or run outside a stage) or
    its file cannot be read (with a warning). Rows with equal ``split`` and ``evaluation_sha256`` pair image by
    image (``same_images``)."""
    kept = kept_predictions(row)
    return None if kept is None else kept.predicted


def load_evaluation_labels(row: pd.Series) -> Optional[np.ndarray]:
    """The true class indices of the images ``load_predictions`` predicts, in the same order; None as it is."""
    kept = kept_predictions(row)
    return None if kept is None else kept.labels


def same_images(first: pd.Series, second: pd.Series) -> bool:
    """Whether two results were scored on the same images in the same order (so their predictions pair)."""
    key = ("split", "evaluation_sha256")
    return all(isinstance(first.get(k), str) for k in key) and all(first.get(k) == second.get(k) for k in key)


def kept_predictions(row: pd.Series) -> Optional[Predictions]:
    name, folder = row.get("predictions_file"), row.get("result_dir")
    if not isinstance(name, str) or not isinstance(folder, str):
        return None
    return read_predictions(str(Path(folder) / name), row.get("evaluation_size"))


@functools.lru_cache(maxsize=4096)
def read_predictions(path: str, size: Optional[float]) -> Optional[Predictions]:
    """The predictions in ``path`` (read-only arrays, read once), checked to hold ``size`` images; None with a
    warning when they cannot be read or hold another number."""
    try:
        kept = Predictions.from_file(Path(path))
    except (OSError, ValueError) as err:
        log.warning("report: cannot read the predictions '%s' (%s); that result has no per-image scores", path, err)
        return None
    if size is None or pd.isna(size) or len(kept.predicted) != int(size):
        log.warning(
            "report: '%s' holds %d predictions, its result evaluated %s images; that result has no per-image scores",
            path,
            len(kept.predicted),
            size,
        )
        return None
    for array in (kept.predicted, kept.labels):
        array.flags.writeable = False
    return kept
