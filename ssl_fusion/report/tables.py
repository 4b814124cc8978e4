"""Aggregate every ``results.json`` under a folder into tables (Markdown, CSV) and plots (PNG).

- the main table: one row per method, one column per label regime, ``mean ± std (n)`` of test
  accuracy over seeds, the best mean of each column in bold, among rows that neither peek at the test set
  (``uses_test``) nor use encoders trained with all labels (``uses_all_labels``);
- results of different datasets (told apart by their data's and pretraining data's fingerprints, ``results.py``)
  or encoders are never averaged, and a result found twice counts once: with more than one combination under the
  folder, each gets its own table (a heading in Markdown and on the terminal, extra columns in the CSV); encoder
  seeds get one table each, plus one pooled over them whose heading names them (``encoder seed 0+1``) and whose
  n reads encoder seeds × label seeds;
- a paired-differences table (``paired.py``): each method minus reference methods on the same labeled subsets
  and encoders, with a design-aware 95% interval, P(improvement) and wins/ties/losses, primary comparisons
  Holm-adjusted and the rest marked exploratory, and ``paired_differences.png``;
- a negative-transfer table: each method with and without an added control pretext
  (``random``, ``noise``) and the difference;
- a per-class table (``per_class.py``): each method's accuracy on each class, the classes named as the dataset
  names them, and ``per_class_accuracy.csv``, where results kept their predictions;
- ``accuracy_vs_labels.png`` (with one label regime: the methods sorted by accuracy) and, where attention-like
  heads ran, ``pretext_weights.png`` (mean weight per class and pretext), drawn by ``figures.py``;
- ``results_long.csv``: one row per result (``LONG_COLUMNS``), for statistics done elsewhere.

Results scored on the dev split (``evaluation.split=dev``) are never pooled or paired with test results: each split
(and each draw of a dev split) gets all of the above on its own, under a heading naming it, its files prefixed by its
name (``dev_paired_differences.csv``, ...). Where results kept their predictions, the paired intervals resample the
evaluated images too (``paired.CORRECT``).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ssl_fusion.report.figures import plot_accuracy, plot_paired_differences, plot_pretext_weights
from ssl_fusion.report.paired import (
    CORRECT,
    Primary,
    paired_control_costs,
    paired_differences,
    parse_primaries,
    shown,
)
from ssl_fusion.report.per_class import per_class_section
from ssl_fusion.report.results import (
    CONTEXT,
    FLAGS,
    METRICS,
    UNRECORDED,
    VARIANT,
    by_regime,
    collect_results,
    context_heading,
    contexts,
    correctness,
    regime_order,
    scored_on,
    splits_of,
)
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.tracking import open_tracker
from ssl_fusion.store.files import atomic_write_text

CONTROLS = ("random", "noise")
# sslfuse report's options of the tracker it logs its files to, and the ``tracking`` key each sets
TRACKING_FLAGS = {"--tracking": "name", "--tracking-uri": "uri", "--tracking-experiment": "experiment"}
# results_long.csv: its columns, each from a field of the results frame (``accuracy`` etc.: of the row's split)
LONG_COLUMNS = {
    "dataset": "dataset",
    "pretraining_dataset": "pretraining_dataset",
    "encoder": "encoder",
    "encoder_seed": "encoder_seed",
    "regime": "regime",
    "label_seed": "seed",
    "family": "family",
    "options": "options",
    "pretexts": "pretext_set",
    "split": "evaluated_on",
    "accuracy": "accuracy",
    "macro_f1": "macro_f1",
    "nll": "nll",
    "selected_l2": "selected_l2",
    "selected_steps": "selected_steps",
    "head_parameters": "head_parameters",
    "fit_seconds": "fit_seconds",
    "commit": "commit",
    "method": "method",
    "n_labeled": "n_labeled",
    "labeled_indices_sha256": "labeled_indices_sha256",
    "data_fingerprint": "data_fingerprint",
    "evaluation_size": "evaluation_size",
    "evaluation_sha256": "evaluation_sha256",
    "predictions": "predictions",
}
SPLIT_NOTES = {
    "test": "Scored on the test split: read these only for choices frozen beforehand.",
    "dev": "Scored on the dev split (held out of the training split and of every labeled subset): for choosing "
    "designs and defaults; never compared with test scores.",
}


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (dataset, encoder, encoder seed, method, regime) with mean, std and count of test
    accuracy in percent, per control pretext the number of seeds whose screen left it out, and whether the row
    peeks at the test set or uses all labels."""
    screened_out = results.get("screened_out", pd.Series(index=results.index, dtype=object))  # absent before the screen
    screened = {
        f"screened_{c}": screened_out.map(lambda out, c=c: isinstance(out, list) and c in out) for c in CONTROLS
    }
    results = results.assign(accuracy=results["test_accuracy"] * 100, **screened)
    keys = [*CONTEXT, *VARIANT, "pretext_set", "regime", "method", "title"]
    groups = results.groupby(keys, sort=False)
    flags = groups[list(FLAGS)].any()
    stats = (
        groups["accuracy"].agg(["mean", "std", "count"]).join(groups[list(screened)].sum()).join(flags).reset_index()
    )
    return stats.rename(columns={"count": "seeds"})


def pooled_over_encoder_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """``summarize``'s rows over all encoder seeds of each dataset and encoder that has more than one: the encoder
    seed column names them (``0+1``) and n reads encoder seeds × label seeds, so a pooled mean never passes for one
    encoder's. Empty when every dataset and encoder has one encoder seed."""
    recorded = results[results["encoder_seed"] != UNRECORDED]
    if recorded.empty:
        return pd.DataFrame()
    names = recorded.groupby(["dataset", "encoder"])["encoder_seed"].transform(
        lambda seeds: "+".join(sorted(set(seeds)))
    )
    several = names.str.contains("+", regex=False)
    if not several.any():
        return pd.DataFrame()
    chosen = recorded[several]
    pooled = summarize(chosen.assign(encoder_seed=names[several]))
    grids = chosen.groupby(["dataset", "encoder", "method", "regime"]).agg(
        encoder_seeds=("encoder_seed", "nunique"), label_seeds=("seed", "nunique"), results=("seed", "size")
    )
    n_text = {
        key: f"{row.encoder_seeds}×{row.label_seeds}"
        if row.encoder_seeds * row.label_seeds == row.results
        else str(row.results)
        for key, row in grids.iterrows()
    }
    pooled["seeds"] = [
        n_text[key] for key in zip(pooled["dataset"], pooled["encoder"], pooled["method"], pooled["regime"])
    ]
    return pooled


def cell(mean: float, std: float, seeds: int, best: bool) -> str:
    text = f"{mean:.2f} ± {0.0 if pd.isna(std) else std:.2f} (n={seeds})"
    return f"**{text}**" if best else text


def pivot_one(stats: pd.DataFrame) -> pd.DataFrame:
    """Methods × regimes of one dataset, encoder and encoder seed; the best mean per regime in bold, taken among
    rows that neither peek at the test set nor use all labels; rows by accuracy in the first regime."""
    honest = ~(stats["uses_test"] | stats["uses_all_labels"])
    best = stats[honest].groupby("regime")["mean"].max().reindex(stats["regime"]).to_numpy()
    is_best = honest.to_numpy() & (stats["mean"].to_numpy() == best)
    cells = stats.assign(
        cell=[cell(m, s, n, b) for m, s, n, b in zip(stats["mean"], stats["std"], stats["seeds"], is_best)]
    )
    table = cells.pivot(index="method", columns="regime", values="cell")
    regimes = sorted(table.columns, key=regime_order)
    first = stats[stats["regime"] == regimes[0]].sort_values("mean", ascending=False)["method"].tolist()
    order = first + sorted(set(table.index) - set(first))
    return table.loc[order, regimes].fillna("–")


def pivot(stats: pd.DataFrame, by_context: bool = False) -> pd.DataFrame:
    """Wide table: methods × regimes (see ``pivot_one``). With more than one (dataset, encoder, encoder seed)
    combination, or ``by_context``, one such table per combination, stacked under an index (dataset, encoder,
    encoder_seed, method); ``sections`` splits it back."""
    if len(contexts(stats)) == 1 and not by_context:
        return pivot_one(stats)
    keys = list(CONTEXT)
    tables = {context: pivot_one(group) for context, group in stats.groupby(keys, sort=False)}
    table = pd.concat(tables, names=[*keys, "method"])
    return table[sorted(table.columns, key=regime_order)].fillna("–")


def sections(table: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """(heading, table indexed by method) per combination of ``pivot``'s result; no heading when there is one.
    A combination's table leaves out the regimes only other combinations have. A table stacked by evaluation split
    (``split_tables``) gives each split's combinations apart, headed with the split."""
    if table.index.names[0] == "split":
        return [
            (f"{split} split, {heading}", part)
            for split, group in table.groupby(level=0, sort=False)
            for heading, part in sections(group.droplevel(0))
        ]
    if table.index.nlevels == 1:
        return [(None, table)]
    parts = []
    for context, part in table.groupby(level=list(range(len(CONTEXT))), sort=False):
        part = part.droplevel(list(range(len(CONTEXT))))
        parts.append((context_heading(context), part.loc[:, (part != "–").any()]))
    return parts


def negative_transfer(stats: pd.DataFrame) -> pd.DataFrame:
    """Each result whose pretexts include a control, next to the same method (its ``VARIANT``: family, options and
    views) and regime without it, with the number of seeds in which the screen left the control out."""
    indexed = stats.set_index([*CONTEXT, *VARIANT, "pretext_set", "regime"])
    rows = []
    for (dataset, encoder, encoder_seed, *variant, pretext_set, regime), row in indexed.iterrows():
        names = pretext_set.split("+")
        for control in CONTROLS:
            base_set = "+".join(n for n in names if n != control)
            base_key = (dataset, encoder, encoder_seed, *variant, base_set, regime)
            if control in names and base_set and base_key in indexed.index:
                base = indexed.loc[base_key]
                rows.append(
                    {
                        "dataset": dataset,
                        "encoder": encoder,
                        "encoder seed": encoder_seed,
                        "fusion": row["title"],
                        "pretexts": base_set,
                        "added": control,
                        "regime": regime,
                        "without": round(float(base["mean"]), 2),
                        "with": round(float(row["mean"]), 2),
                        "difference": round(float(row["mean"] - base["mean"]), 2),
                        "screened out": f"{int(row[f'screened_{control}'])} of {row['seeds']} seeds",
                    }
                )
    transfer = pd.DataFrame(rows)
    # one combination: its columns would repeat one value on every row
    return (
        transfer.drop(columns=["dataset", "encoder", "encoder seed"], errors="ignore")
        if len(contexts(stats)) == 1
        else transfer
    )


@dataclass
class SplitReport:
    """The report of the results scored on one evaluation split."""

    split: str
    stats: pd.DataFrame  # ``summarize``'s rows, pooled over encoder seeds first where there are several
    markdown: str


def split_report(
    results: pd.DataFrame, split: str, references: list[str] | None, primaries: list[Primary] | None, out_dir: Path
) -> SplitReport:
    """Tables, plots and CSVs of ``results``, all scored on ``split`` (``scored_on``); the files of a split other than
    test are named with its prefix (``dev_paired_differences.csv``), so that no file holds two splits."""
    prefix = "" if split == "test" else re.sub(r"[^A-Za-z0-9.]+", "_", split).strip("_") + "_"
    results = results.assign(**{CORRECT: correctness(results)})
    per_encoder_seed = summarize(results)
    pooled = pooled_over_encoder_seeds(results)
    stats = per_encoder_seed if pooled.empty else pd.concat([pooled, per_encoder_seed], ignore_index=True)
    markdown = (
        f"{split.capitalize()} accuracy (%), mean ± std over seeds (n: label seeds, or encoder seeds × label "
        "seeds where encoder seeds are pooled); best per column in bold, among rows that neither peek at the "
        f"{'test set' if split == 'test' else 'evaluation split'} nor use all labels.\n"
    )
    for heading, part in sections(pivot(stats)):
        markdown += f"\n## {heading}\n" if heading else ""
        markdown += "\n" + part.reset_index().to_markdown(index=False) + "\n"
    markdown += paired_section(results, references, primaries, out_dir, prefix)
    transfer = negative_transfer(stats)
    if not transfer.empty:
        markdown += "\nNegative transfer: accuracy without and with a control pretext added.\n\n"
        markdown += transfer.to_markdown(index=False) + "\n"
        atomic_write_text(out_dir / f"{prefix}negative_transfer.csv", transfer.to_csv(index=False))
        costs = by_regime(paired_control_costs(results, CONTROLS))
        markdown += (
            "\nNegative transfer, paired: with the control minus without it, same method, labeled subset and "
            "encoders (accuracy points, design-aware 95% interval as above, exploratory, W/T/L).\n\n"
            + shown(costs).to_markdown(index=False)
            + "\n"
        )
        atomic_write_text(out_dir / f"{prefix}negative_transfer_paired.csv", costs.to_csv(index=False))
    markdown += per_class_section(results, out_dir, prefix)
    plot_accuracy(per_encoder_seed if pooled.empty else pooled, out_dir / f"{prefix}accuracy_vs_labels.png", split)
    if plot_pretext_weights(results, out_dir / f"{prefix}pretext_weights.png"):
        markdown += f"\n![pretext weights]({prefix}pretext_weights.png)\n"
    markdown += f"\n![accuracy vs labels]({prefix}accuracy_vs_labels.png)\n"
    return SplitReport(split, stats, markdown)


def split_tables(reports: list[SplitReport]) -> pd.DataFrame:
    """The wide table of the reports (``pivot``): test results alone as before; otherwise each split's tables
    stacked under a first index level ``split``, which ``sections`` heads them with."""
    if [report.split for report in reports] == ["test"]:
        return pivot(reports[0].stats)
    tables = {report.split: pivot(report.stats, by_context=True) for report in reports}
    return pd.concat(tables, names=["split"]).fillna("–")


def predictions_path(row: pd.Series, out_dir: Path) -> str | None:
    """The file of a result's kept predictions, relative to ``out_dir``; None when it kept none."""
    name, folder = row.get("predictions_file"), row.get("result_dir")
    if not isinstance(name, str) or not isinstance(folder, str):
        return None
    return os.path.relpath(Path(folder) / name, out_dir)


def long_results(results: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """``results_long.csv``: one row per result, the ``LONG_COLUMNS`` (a field a result lacks is empty); the
    metrics of the row's own split; ``predictions``: its predictions' file, relative to ``out_dir``."""
    rows = [row for _, row in results.iterrows()]
    results = results.assign(
        options=results["options_key"],
        predictions=[predictions_path(row, out_dir) for row in rows],
        **{metric: [row.get(f"{row['split']}_{metric}") for row in rows] for metric in METRICS},
    )
    return pd.DataFrame({column: results.get(field) for column, field in LONG_COLUMNS.items()})


# the files a report writes only when it has something to put in them (each split's, prefixed by its name)
OPTIONAL_OUTPUTS = re.compile(
    r"(dev\S*_)?(paired_differences\.(csv|png)|negative_transfer(_paired)?\.csv|per_class_accuracy\.csv"
    r"|pretext_weights\.png|accuracy_vs_labels\.png)"
)


def remove_earlier_outputs(out_dir: Path, started: float) -> None:
    """Once the new report is written, remove the files of an earlier one that it did not write again (older than
    ``started``): a table this report has no rows for must not stay beside it looking current. A report that fails
    midway removes nothing, so the earlier files stay whole."""
    for path in out_dir.iterdir():
        if path.is_file() and OPTIONAL_OUTPUTS.fullmatch(path.name) and path.stat().st_mtime < started:
            path.unlink()


def write_report(
    folder: Path,
    out_dir: Path | None = None,
    references: list[str] | None = None,
    primaries: list[Primary] | None = None,
) -> tuple[pd.DataFrame, Path, Path]:
    """Tables, plots and CSVs of every result under ``folder`` (see the module's docstring), each evaluation split
    apart; ``references``: the paired table's reference methods (None: ``paired.DEFAULT_REFERENCES``, those that
    ran); ``primaries``: its comparisons adjusted as a family (None: every row exploratory). Returns the wide table
    (``split_tables``) and the paths of report.md and report.csv."""
    out_dir = out_dir or folder
    results = collect_results(folder)
    started = time.time()
    reports = [
        split_report(scored_on(results, split), split, references, primaries, out_dir) for split in splits_of(results)
    ]
    headed = [report.split for report in reports] != ["test"]
    markdown = "\n".join(
        (f"# {report.split.capitalize()} split\n\n{SPLIT_NOTES.get(report.split, '')}\n\n" if headed else "")
        + report.markdown
        for report in reports
    )
    stats = pd.concat([report.stats.assign(split=report.split) for report in reports], ignore_index=True)
    md_path, csv_path = out_dir / "report.md", out_dir / "report.csv"
    atomic_write_text(out_dir / "results_long.csv", long_results(results, out_dir).to_csv(index=False))
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, stats.to_csv(index=False))
    remove_earlier_outputs(out_dir, started)
    return split_tables(reports), md_path, csv_path


def paired_section(
    results: pd.DataFrame,
    references: list[str] | None,
    primaries: list[Primary] | None,
    out_dir: Path,
    prefix: str = "",
) -> str:
    """The paired-differences table (Markdown), its CSV and plot beside the report, their names prefixed by
    ``prefix``; empty when nothing pairs."""
    differences = by_regime(paired_differences(results, references, primaries))
    if differences.empty:
        return ""
    atomic_write_text(out_dir / f"{prefix}paired_differences.csv", differences.to_csv(index=False))
    plot_paired_differences(differences, out_dir / f"{prefix}paired_differences.png")
    table = shown(differences)
    if table[["dataset", "encoder"]].drop_duplicates().shape[0] == 1:
        table = table.drop(columns=["dataset", "encoder"])
    levels = differences["resampled"].unique()
    resampled = f" Every row resamples {levels[0]}." if len(levels) == 1 else ""
    conditional = (
        " With one encoder seed, the interval is conditional on that encoder: it resamples label seeds "
        "(and test images where kept) and says nothing of another pretraining run."
        if differences["resampled"].str.startswith("conditional").any()
        else ""
    )
    family = (
        ""
        if "p (Holm)" not in differences
        else f" Primary rows ({(differences['role'] == 'primary').sum()}) are Holm-adjusted as one family: "
        "p (Holm) and the Holm 95% interval, which excludes 0 exactly when Holm rejects; every other row is "
        "exploratory."
    )
    return (
        "\nPaired differences (accuracy points, method − reference) over results on the same labeled subset "
        "and the same encoders; pairs: n, or n (encoder seeds × label seeds). The 95% interval resamples encoder "
        "seeds, label seeds and, where both methods kept their test predictions, test images (docs/statistics.md)"
        "; where they were not kept it has no test-image level. p: of no difference; P(improvement): share of "
        "paired runs the method wins, ties half, with its 95% interval; W/T/L: pairs the method wins, ties, loses."
        + resampled
        + conditional
        + family
        + "\n\n"
        + table.to_markdown(index=False)
        + f"\n\n![paired differences]({prefix}paired_differences.png)\n"
    )


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


USAGE = (
    "usage: sslfuse report <folder> [--reference=concat,select[by=val],best-single] "
    "[--primary=method:reference[,method:reference...]] [--tracking=mlflow [--tracking-uri=<uri>] "
    "[--tracking-experiment=<name>]]  (a run or multirun folder holding results.json files)"
)
HELP = f"""{USAGE}

Aggregates every results.json under <folder> into report.md, report.csv, results_long.csv and the plots, written
into <folder>.

options:
  --reference=a,b,...     the methods each method is paired with (default: concat, select[by=val] and best-single,
                          those that ran)
  --primary=m:r[,m:r...]  comparisons (method:reference) Holm-adjusted as one family; may repeat; the other rows
                          are exploratory
  --tracking=mlflow       also record the report's files in MLflow (pip install 'sslfuse[tracking]'; docs/tracking.md)
  --tracking-uri=<uri>    its store (default: outputs/mlruns, a local file store)
  --tracking-experiment=<name>
                          its experiment (default: sslfuse)
  -h, --help              show this help and exit"""


def parse_arguments(argv: list[str]) -> tuple[Path, list[str] | None, list[Primary]]:
    """``<folder> [--reference=a,b,...] [--primary=method:reference,...]`` (``--primary`` may repeat)."""
    folders = [arg for arg in argv if not arg.startswith("-")]
    options = [arg for arg in argv if arg.startswith("-")]
    references, primaries = None, []
    for option in options:
        name, _, value = option.partition("=")
        if name == "--reference":
            references = [reference for reference in value.split(",") if reference]
        elif name == "--primary":
            try:
                primaries += parse_primaries(value)
            except ValueError as err:
                raise UserError(f"report: --primary: {err}; {USAGE}") from None
        else:
            raise UserError(USAGE)
    if len(folders) != 1 or references == []:
        raise UserError(USAGE)
    return Path(folders[0]), references, primaries


def tracking_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--tracking=<tracker> [--tracking-uri=<uri>] [--tracking-experiment=<name>]`` as the ``tracking`` options
    (``conf/tracking``; none given: no tracking), and the other arguments."""
    options, rest = {"name": "none"}, []
    for arg in argv:
        flag, _, value = arg.partition("=")
        if flag in TRACKING_FLAGS:
            options[TRACKING_FLAGS[flag]] = value
        else:
            rest.append(arg)
    return options, rest


def report_files(out_dir: Path) -> list[Path]:
    """The files a report wrote in ``out_dir``: its tables, CSVs and plots."""
    return sorted(
        path
        for path in out_dir.iterdir()
        if path.name in ("report.md", "report.csv", "results_long.csv") or OPTIONAL_OUTPUTS.fullmatch(path.name)
    )


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(HELP)
        return
    options, argv = tracking_options(argv)
    tracker = open_tracker(options, Path.cwd())
    folder, references, primaries = parse_arguments(argv)
    table, md_path, csv_path = write_report(folder, references=references, primaries=primaries)
    split = "" if table.index.names[0] == "split" else "test "
    print_table(table, f"{split}accuracy (%) under {folder}")
    print(f"wrote {md_path}, {csv_path}, results_long.csv and the plots beside them")
    params = {"folder": folder.resolve(), "references": references, "primaries": primaries}
    tracker.log_run(f"report {folder}", "report", params, {}, report_files(md_path.parent))
