"""Aggregate every ``results.json`` under a folder into mean ± std tables (Markdown and CSV)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from ssl_fusion.errors import UserError
from ssl_fusion.store import atomic_write_text


def collect_results(folder: Path) -> pd.DataFrame:
    if not folder.is_dir():
        raise UserError(f"report: '{folder}' is not a folder")
    records = [json.loads(path.read_text()) for path in sorted(folder.rglob("results.json"))]
    if not records:
        raise UserError(f"report: no results.json under '{folder}'")
    return pd.DataFrame(records)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (method, regime) with mean, std and count of test accuracy in percent."""
    results = results.assign(accuracy=results["test_accuracy"] * 100)
    stats = results.groupby(["method", "regime"], sort=False)["accuracy"].agg(["mean", "std", "count"]).reset_index()
    return stats.rename(columns={"count": "seeds"})


def regime_order(regime: str) -> tuple[int, float]:
    """Per-class regimes first, then fractions, each ascending."""
    if regime.endswith("/class"):
        return 0, float(regime.split("/")[0])
    return 1, float(regime.rstrip("%"))


def pivot(stats: pd.DataFrame) -> pd.DataFrame:
    """Wide table: one row per method, one column per label regime, cells 'mean ± std (n)'."""
    cells = stats.assign(
        cell=[f"{m:.2f} ± {0.0 if pd.isna(s) else s:.2f} (n={n})" for m, s, n in zip(stats["mean"], stats["std"], stats["seeds"])]
    )
    table = cells.pivot(index="method", columns="regime", values="cell")
    regimes = sorted(table.columns, key=regime_order)
    best_first = stats[stats["regime"] == regimes[0]].sort_values("mean", ascending=False)["method"]
    order = list(best_first) + [m for m in table.index if m not in set(best_first)]
    return table.loc[order, regimes].fillna("–")


def write_report(folder: Path, out_dir: Path | None = None) -> tuple[pd.DataFrame, Path, Path]:
    out_dir = out_dir or folder
    stats = summarize(collect_results(folder))
    table = pivot(stats)
    markdown = "Test accuracy (%), mean ± std over seeds\n\n" + table.reset_index().to_markdown(index=False) + "\n"
    md_path, csv_path = out_dir / "report.md", out_dir / "report.csv"
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, stats.to_csv(index=False))
    return table, md_path, csv_path


def print_table(table: pd.DataFrame, title: str) -> None:
    view = Table(title=title)
    view.add_column("method")
    for column in table.columns:
        view.add_column(f"{column} labels", justify="right")
    for method, row in table.iterrows():
        view.add_row(method, *row.tolist())
    Console().print(view)


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0].startswith("-"):
        raise UserError("usage: sslfuse report <folder>  (a run or multirun folder holding results.json files)")
    folder = Path(argv[0])
    table, md_path, csv_path = write_report(folder)
    print_table(table, f"test accuracy (%) under {folder}")
    print(f"wrote {md_path} and {csv_path}")
