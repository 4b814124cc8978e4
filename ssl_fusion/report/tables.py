"""Aggregate every ``results.json`` under a folder into tables (Markdown, CSV) and plots (PNG).

- the main table: one row per method, one column per label regime, ``mean ± std (n)`` of test
  accuracy over seeds, the best mean of each column in bold, among rows that neither peek at the test set
  (``peeks_at_test``) nor use encoders trained with all labels (``uses_all_labels``);
- results of different datasets or encoders are never averaged: with more than one such combination under the
  folder, each gets its own table (a heading in Markdown and on the terminal, extra columns in the CSV); encoder
  seeds get one table each, plus one pooled over them whose heading names them (``encoder seed 0+1``) and whose
  n reads encoder seeds × label seeds;
- a paired-differences table (``paired.py``): each method minus reference methods on the same labeled subsets
  and encoders, with a 95% interval and wins/ties/losses, and ``paired_differences.png``;
- a negative-transfer table: each method with and without an added control pretext
  (``random``, ``noise``) and the difference;
- ``accuracy_vs_labels.png`` (with one label regime: the methods sorted by accuracy) and, where attention-like
  heads ran, ``pretext_weights.png`` (mean weight per class and pretext).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ssl_fusion.report.paired import family as method_family
from ssl_fusion.report.paired import (
    paired_control_costs,
    paired_differences,
    plot_paired_differences,
)
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.store.files import atomic_write_bytes, atomic_write_text

CONTROLS = ("random", "noise")
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
# what results must share to be averaged, besides method, regime and pretexts
CONTEXT = ("dataset", "encoder", "encoder_seed")
UNRECORDED = "unrecorded"  # results from before a context field was written form one group of their own
# method names that mark a row which cannot be best, for results from before the flags were written
DISHONEST_MARKS = {"peeks_at_test": "[oracle: uses test]", "uses_all_labels": "[all labels]"}


def collect_results(folder: Path) -> pd.DataFrame:
    if not folder.is_dir():
        raise UserError(f"report: '{folder}' is not a folder")
    records = [json.loads(path.read_text()) for path in sorted(folder.rglob("results.json"))]
    if not records:
        raise UserError(f"report: no results.json under '{folder}'")
    results = with_context(pd.DataFrame(records))
    results["pretext_set"] = results["pretexts"].map(lambda names: "+".join(sorted(names)))
    return results


def context_value(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return UNRECORDED
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def with_context(results: pd.DataFrame) -> pd.DataFrame:
    """Dataset, encoder and encoder seed as text (missing ones as ``unrecorded``), and the two flags of rows that
    cannot be best as booleans, set by the field or by the method name's mark."""
    results = results.copy()
    for column in CONTEXT:
        values = results[column] if column in results else pd.Series(None, index=results.index, dtype=object)
        results[column] = values.astype(object).map(context_value)
    for flag, mark in DISHONEST_MARKS.items():
        values = results[flag] if flag in results else pd.Series(None, index=results.index, dtype=object)
        named = results["method"].str.contains(mark, regex=False)
        results[flag] = [(isinstance(v, (bool, np.bool_)) and bool(v)) or bool(n) for v, n in zip(values, named)]
    return results


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (dataset, encoder, encoder seed, method, regime) with mean, std and count of test
    accuracy in percent, per control pretext the number of seeds whose screen left it out, and whether the row
    peeks at the test set or uses all labels."""
    results = with_context(results)
    screened_out = results.get("screened_out", pd.Series(index=results.index, dtype=object))  # absent before the screen
    screened = {f"screened_{c}": screened_out.map(lambda out, c=c: isinstance(out, list) and c in out) for c in CONTROLS}
    results = results.assign(accuracy=results["test_accuracy"] * 100, **screened)
    keys = [*CONTEXT, "method", "regime", "fusion", "pretext_set"]
    groups = results.groupby(keys, sort=False)
    flags = groups[list(DISHONEST_MARKS)].any()
    stats = groups["accuracy"].agg(["mean", "std", "count"]).join(groups[list(screened)].sum()).join(flags).reset_index()
    return stats.rename(columns={"count": "seeds"})


def pooled_over_encoder_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """``summarize``'s rows over all encoder seeds of each dataset and encoder that has more than one: the encoder
    seed column names them (``0+1``) and n reads encoder seeds × label seeds, so a pooled mean never passes for one
    encoder's. Empty when every dataset and encoder has one encoder seed."""
    recorded = with_context(results).query("encoder_seed != @UNRECORDED")
    if recorded.empty:
        return pd.DataFrame()
    names = recorded.groupby(["dataset", "encoder"])["encoder_seed"].transform(lambda seeds: "+".join(sorted(set(seeds))))
    several = names.str.contains("+", regex=False)
    if not several.any():
        return pd.DataFrame()
    chosen = recorded[several]
    pooled = summarize(chosen.assign(encoder_seed=names[several]))
    grids = chosen.groupby(["dataset", "encoder", "method", "regime"]).agg(
        encoder_seeds=("encoder_seed", "nunique"), label_seeds=("seed", "nunique"), results=("seed", "size"))
    n_text = {key: f"{row.encoder_seeds}×{row.label_seeds}" if row.encoder_seeds * row.label_seeds == row.results
              else str(row.results) for key, row in grids.iterrows()}
    pooled["seeds"] = [n_text[key] for key in zip(pooled["dataset"], pooled["encoder"], pooled["method"], pooled["regime"])]
    return pooled


def contexts(stats: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The (dataset, encoder, encoder seed) combinations present, sorted."""
    return sorted(set(zip(*(stats[c] for c in CONTEXT))))


def context_heading(context: tuple[str, str, str]) -> str:
    dataset, encoder, encoder_seed = context
    return f"dataset {dataset}, encoder {encoder}, encoder seed {encoder_seed}"


def regime_order(regime: str) -> tuple[int, float]:
    """Per-class regimes first, then fractions, each ascending."""
    if regime.endswith("/class"):
        return 0, float(regime.split("/")[0])
    return 1, float(regime.rstrip("%"))


def by_regime(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in ``regime_order``, each regime's rows in their order."""
    if table.empty:
        return table
    return table.sort_values("regime", key=lambda regimes: regimes.map(regime_order), kind="stable").reset_index(drop=True)


def cell(mean: float, std: float, seeds: int, best: bool) -> str:
    text = f"{mean:.2f} ± {0.0 if pd.isna(std) else std:.2f} (n={seeds})"
    return f"**{text}**" if best else text


def pivot_one(stats: pd.DataFrame) -> pd.DataFrame:
    """Methods × regimes of one dataset, encoder and encoder seed; the best mean per regime in bold, taken among
    rows that neither peek at the test set nor use all labels; rows by accuracy in the first regime."""
    honest = ~(stats["peeks_at_test"] | stats["uses_all_labels"])
    best = stats[honest].groupby("regime")["mean"].max().reindex(stats["regime"]).to_numpy()
    is_best = honest.to_numpy() & (stats["mean"].to_numpy() == best)
    cells = stats.assign(cell=[cell(m, s, n, b) for m, s, n, b in zip(stats["mean"], stats["std"], stats["seeds"], is_best)])
    table = cells.pivot(index="method", columns="regime", values="cell")
    regimes = sorted(table.columns, key=regime_order)
    first = stats[stats["regime"] == regimes[0]].sort_values("mean", ascending=False)["method"].tolist()
    order = first + sorted(set(table.index) - set(first))
    return table.loc[order, regimes].fillna("–")


def pivot(stats: pd.DataFrame) -> pd.DataFrame:
    """Wide table: methods × regimes (see ``pivot_one``). With more than one (dataset, encoder, encoder seed)
    combination, one such table per combination, stacked under an index (dataset, encoder, encoder_seed, method);
    ``sections`` splits it back."""
    if len(contexts(stats)) == 1:
        return pivot_one(stats)
    keys = list(CONTEXT)
    tables = {context: pivot_one(group) for context, group in stats.groupby(keys, sort=False)}
    table = pd.concat(tables, names=[*keys, "method"])
    return table[sorted(table.columns, key=regime_order)].fillna("–")


def sections(table: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """(heading, table indexed by method) per combination of ``pivot``'s result; no heading when there is one.
    A combination's table leaves out the regimes only other combinations have."""
    if table.index.nlevels == 1:
        return [(None, table)]
    parts = []
    for context, part in table.groupby(level=list(range(len(CONTEXT))), sort=False):
        part = part.droplevel(list(range(len(CONTEXT))))
        parts.append((context_heading(context), part.loc[:, (part != "–").any()]))
    return parts


def negative_transfer(stats: pd.DataFrame) -> pd.DataFrame:
    """Each result whose pretexts include a control, next to the same method and regime without it, with the
    number of seeds in which the screen left the control out."""
    # the method without its pretext list, e.g. select[by=knn]: variants of one head stay apart
    family = stats["method"].map(method_family).rename("family")
    indexed = stats.set_index([*CONTEXT, family, "pretext_set", "regime"])
    rows = []
    for (dataset, encoder, encoder_seed, fusion, pretext_set, regime), row in indexed.iterrows():
        names = pretext_set.split("+")
        for control in CONTROLS:
            base_set = "+".join(n for n in names if n != control)
            base_key = (dataset, encoder, encoder_seed, fusion, base_set, regime)
            if control in names and base_set and base_key in indexed.index:
                base = indexed.loc[base_key]
                rows.append({
                    "dataset": dataset, "encoder": encoder, "encoder seed": encoder_seed, "fusion": fusion, "pretexts": base_set, "added": control, "regime": regime,
                    "without": round(float(base["mean"]), 2), "with": round(float(row["mean"]), 2),
                    "difference": round(float(row["mean"] - base["mean"]), 2),
                    "screened out": f"{int(row[f'screened_{control}'])} of {row['seeds']} seeds",
                })
    transfer = pd.DataFrame(rows)
    # one combination: its columns would repeat one value on every row
    return transfer.drop(columns=["dataset", "encoder", "encoder seed"], errors="ignore") if len(contexts(stats)) == 1 else transfer


def save_figure(figure, path: Path) -> None:
    """Render the PNG in memory and write it atomically: a reader never sees half a plot."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_accuracy(stats: pd.DataFrame, path: Path) -> None:
    """Accuracy of every method: with one label regime, the methods sorted along one axis, a dot and its spread
    each; with several, a line per method over the regimes."""
    if stats["regime"].nunique() == 1:
        plot_methods_sorted(stats, path)
    else:
        plot_accuracy_vs_labels(stats, path)


def plot_methods_sorted(stats: pd.DataFrame, path: Path) -> None:
    """One panel per (dataset, encoder, encoder seed) combination: methods sorted by mean accuracy, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(stats.groupby(list(CONTEXT), sort=False))
    rows = max(len(group) for _, group in groups)
    figure, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 1.2 + 0.35 * rows), squeeze=False)
    for axis, (context, group) in zip(axes[0], groups):
        group = group.sort_values("mean")
        honest = ~(group["peeks_at_test"] | group["uses_all_labels"])
        colours = ["tab:blue" if h else "tab:gray" for h in honest]
        for row, (mean, spread, colour) in enumerate(zip(group["mean"], group["std"].fillna(0), colours)):
            axis.errorbar(mean, row, xerr=spread, fmt="o", color=colour, capsize=3)
        axis.set_yticks(range(len(group)), [f"{m} (n={n})" for m, n in zip(group["method"], group["seeds"])], fontsize=8)
        axis.set_xlabel(f"test accuracy (%), {group['regime'].iloc[0]} labels, mean ± std over seeds")
        axis.grid(axis="x", alpha=0.3)
        if len(groups) > 1:
            axis.set_title(context_heading(context), fontsize=9)
    save_figure(figure, path)


def plot_accuracy_vs_labels(stats: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = sorted(stats["regime"].unique(), key=regime_order)
    several = len(contexts(stats)) > 1
    figure, axes = plt.subplots(figsize=(11, 5))
    lines = list(stats.groupby([*CONTEXT, "method"]))
    for number, ((*context, method), group) in enumerate(lines):
        label = f"{method}, {context_heading(tuple(context))}" if several else method
        group = group.set_index("regime").reindex(regimes)
        # the colour cycle has 10 colours: each further ten methods get another line style and marker
        style = {"linestyle": LINE_STYLES[number // 10 % len(LINE_STYLES)], "marker": MARKERS[number // 10 % len(MARKERS)]}
        dodge = 0.3 * (number / max(len(lines) - 1, 1) - 0.5)  # side by side at each regime: error bars apart
        axes.errorbar([x + dodge for x in range(len(regimes))], group["mean"], yerr=group["std"].fillna(0), capsize=3,
                      label=label, **style)
    axes.set_xticks(range(len(regimes)), [f"{r} labels" for r in regimes])
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("accuracy vs. labels (mean ± std over seeds)")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(figure, path)


def plot_pretext_weights(results: pd.DataFrame, path: Path) -> bool:
    """Heatmap of mean pretext weight per class for the first weighted method (smallest regime) of the first
    (dataset, encoder, encoder seed) combination. False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "pretext_weights_per_class" not in results:
        return False
    weighted = results[results["pretext_weights_per_class"].notna()]
    if weighted.empty:
        return False
    context = contexts(weighted)[0]
    weighted = weighted[[tuple(r) == context for r in zip(*(weighted[c] for c in CONTEXT))]]
    regime = sorted(weighted["regime"].unique(), key=regime_order)[0]
    chosen = weighted[weighted["regime"] == regime]
    method = sorted(chosen["method"].unique())[0]
    per_class = [pd.DataFrame(r).T for r in chosen[chosen["method"] == method]["pretext_weights_per_class"]]
    mean = sum(per_class) / len(per_class)
    figure, axes = plt.subplots(figsize=(1.2 * mean.shape[1] + 3, 0.4 * mean.shape[0] + 2))
    image = axes.imshow(mean.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    axes.set_xticks(range(mean.shape[1]), mean.columns)
    axes.set_yticks(range(mean.shape[0]), [f"class {c}" for c in mean.index])
    where = f" ({context_heading(context)})" if len(contexts(results)) > 1 else ""
    axes.set_title(f"{method}, {regime} labels{where}: mean weight per class", fontsize=9)
    figure.colorbar(image)
    save_figure(figure, path)
    return True


def write_report(folder: Path, out_dir: Path | None = None,
                 references: list[str] | None = None) -> tuple[pd.DataFrame, Path, Path]:
    """Tables, plots and CSVs of every result under ``folder`` (see the module's docstring); ``references``: the
    paired table's reference methods (None: ``paired.DEFAULT_REFERENCES``, those that ran)."""
    out_dir = out_dir or folder
    results = collect_results(folder)
    per_encoder_seed = summarize(results)
    pooled = pooled_over_encoder_seeds(results)
    stats = per_encoder_seed if pooled.empty else pd.concat([pooled, per_encoder_seed], ignore_index=True)
    table = pivot(stats)
    markdown = ("Test accuracy (%), mean ± std over seeds (n: label seeds, or encoder seeds × label seeds where "
                "encoder seeds are pooled); best per column in bold, among rows that neither peek at the test set nor "
                "use all labels.\n")
    for heading, part in sections(table):
        markdown += f"\n## {heading}\n" if heading else ""
        markdown += "\n" + part.reset_index().to_markdown(index=False) + "\n"
    markdown += paired_section(results, references, out_dir)
    transfer = negative_transfer(stats)
    if not transfer.empty:
        markdown += "\nNegative transfer: accuracy without and with a control pretext added.\n\n"
        markdown += transfer.to_markdown(index=False) + "\n"
        atomic_write_text(out_dir / "negative_transfer.csv", transfer.to_csv(index=False))
        costs = by_regime(paired_control_costs(results, CONTROLS))
        markdown += ("\nNegative transfer, paired: with the control minus without it, same method, labeled subset and "
                     "encoders (accuracy points, 95% Student-t interval, W/T/L).\n\n" + costs.to_markdown(index=False) + "\n")
        atomic_write_text(out_dir / "negative_transfer_paired.csv", costs.to_csv(index=False))
    plot_accuracy(per_encoder_seed if pooled.empty else pooled, out_dir / "accuracy_vs_labels.png")
    if plot_pretext_weights(results, out_dir / "pretext_weights.png"):
        markdown += "\n![pretext weights](pretext_weights.png)\n"
    markdown += "\n![accuracy vs labels](accuracy_vs_labels.png)\n"
    md_path, csv_path = out_dir / "report.md", out_dir / "report.csv"
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, stats.to_csv(index=False))
    return table, md_path, csv_path


def paired_section(results: pd.DataFrame, references: list[str] | None, out_dir: Path) -> str:
    """The paired-differences table (Markdown), its CSV and plot beside the report; empty when nothing pairs."""
    differences = by_regime(paired_differences(results, references))
    if differences.empty:
        return ""
    atomic_write_text(out_dir / "paired_differences.csv", differences.to_csv(index=False))
    plot_paired_differences(differences, out_dir / "paired_differences.png")
    shown = differences.drop(columns=["low", "high"])
    if shown[["dataset", "encoder"]].drop_duplicates().shape[0] == 1:
        shown = shown.drop(columns=["dataset", "encoder"])
    return ("\nPaired differences (accuracy points, method − reference) over results on the same labeled subset "
            "and the same encoders; pairs: n, or n (encoder seeds × label seeds); 95% Student-t interval; W/T/L: "
            "pairs the method wins, ties, loses.\n\n" + shown.to_markdown(index=False)
            + "\n\n![paired differences](paired_differences.png)\n")


def print_table(table: pd.DataFrame, title: str) -> None:
    """The table on the terminal, one per (dataset, encoder, encoder seed) combination; names are escaped, since
    rich reads ``[by=val]`` as markup."""
    for heading, part in sections(table):
        view = Table(title=escape(f"{title}, {heading}" if heading else title))
        view.add_column("method")
        for column in part.columns:
            view.add_column(f"{column} labels", justify="right")
        for method, row in part.iterrows():
            view.add_row(escape(method), *[str(v).replace("**", "") for v in row.tolist()])
        Console().print(view)


def parse_arguments(argv: list[str]) -> tuple[Path, list[str] | None]:
    """``<folder> [--reference a,b,...]``."""
    usage = ("usage: sslfuse report <folder> [--reference=concat,select[by=val],best-single]  (a run or multirun "
             "folder holding results.json files)")
    folders = [arg for arg in argv if not arg.startswith("-")]
    options = [arg for arg in argv if arg.startswith("-")]
    references = None
    for option in options:
        if not option.startswith("--reference="):
            raise UserError(usage)
        references = [name for name in option.split("=", 1)[1].split(",") if name]
    if len(folders) != 1 or references == []:
        raise UserError(usage)
    return Path(folders[0]), references


def main(argv: list[str]) -> None:
    folder, references = parse_arguments(argv)
    table, md_path, csv_path = write_report(folder, references=references)
    print_table(table, f"test accuracy (%) under {folder}")
    print(f"wrote {md_path}, {csv_path} and the plots beside them")
