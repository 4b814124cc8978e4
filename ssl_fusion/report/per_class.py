"""Per-class accuracy: the share of each class's evaluated images a method got right, from the predictions its
results kept, each class named as its results name it (their ``classes``: the dataset's class names; a result
written before they were kept names a class by its index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ssl_fusion.evaluation.result import class_names
from ssl_fusion.report.results import CONTEXT, by_regime, context_heading, contexts, kept_predictions
from ssl_fusion.store.files import atomic_write_text

KEYS = [*CONTEXT, "regime", "method"]


def class_accuracies(row: pd.Series) -> list[dict]:
    """One row per class the result evaluated (``KEYS``, ``class``, ``accuracy`` in %); none when it kept no
    predictions."""
    kept = kept_predictions(row)
    if kept is None:
        return []
    present = np.unique(kept.labels)
    names = class_names(row.get("classes"), int(present.max(initial=0)) + 1)
    right = kept.predicted == kept.labels
    return [
        {**{key: row[key] for key in KEYS}, "class": names[c], "accuracy": 100 * float(right[kept.labels == c].mean())}
        for c in present
    ]


def per_class_accuracy(results: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (dataset, encoder, encoder seed, regime, method, class) of the results that kept their
    predictions, with the mean over seeds of the class's accuracy (%) and the number of seeds; classes in the order
    of their indices, regimes in ``regime_order``. Empty when no result kept its predictions."""
    rows = [found for _, row in results.iterrows() for found in class_accuracies(row)]
    if not rows:
        return pd.DataFrame()
    groups = pd.DataFrame(rows).groupby([*KEYS, "class"], sort=False)["accuracy"]
    return by_regime(groups.agg(accuracy="mean", seeds="size").reset_index())


def per_class_section(results: pd.DataFrame, out_dir: Path, prefix: str = "") -> str:
    """The per-class table in Markdown (methods × class names, one table per dataset, encoder and encoder seed) and
    its long CSV beside the report, named with ``prefix``; empty when no result kept its predictions."""
    table = per_class_accuracy(results)
    if table.empty:
        return ""
    atomic_write_text(out_dir / f"{prefix}per_class_accuracy.csv", table.to_csv(index=False))
    several = len(contexts(table)) > 1
    text = (
        "\nPer-class accuracy (%): of each class's evaluated images, the share the method got right, mean over "
        "label seeds (n), from the predictions the results kept.\n"
    )
    for context, part in table.groupby(list(CONTEXT), sort=False):
        seeds = part.groupby(["regime", "method"], sort=False)["seeds"].max().rename("n")
        wide = part.pivot_table(index=["regime", "method"], columns="class", values="accuracy", sort=False)
        wide = seeds.to_frame().join(wide.round(1)).reset_index()
        text += (f"\n### {context_heading(context)}\n" if several else "") + "\n" + wide.to_markdown(index=False) + "\n"
    return text
