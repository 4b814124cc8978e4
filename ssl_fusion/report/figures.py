"""The report's plots, each written atomically as a PNG beside the tables."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pandas as pd

from ssl_fusion.report.paired import PRIMARY
from ssl_fusion.report.results import CONTEXT, context_heading, contexts, regime_order
from ssl_fusion.store.files import atomic_write_bytes

LINE_STYLES = ("-", "--", ":", "-.")
LABEL_CHAR_INCHES = 0.07  # about the width of a character of an 8-point tick label
PLOT_INCHES = 5.0  # the paired-differences plot beside its row labels
MARKERS = ("o", "s", "^", "D")


def save_figure(figure, path: Path) -> None:
    """Lay the figure out with its titles fitted (``fit_titles``), render the PNG in memory and write it atomically:
    a reader never sees half a plot."""
    import matplotlib.pyplot as plt

    fit_titles(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def fit_titles(figure, rounds: int = 4) -> None:
    """Lay ``figure`` out (``tight_layout``) with each axes' title wrapped onto as many lines as it needs to lie
    inside the figure: a title is centred on its axes, and long tick labels leave the axes narrower than the figure.
    The layout is made without titles first (a title wider than the figure defeats it), then each title is wrapped
    to the room its axes' centre leaves, measured on the renderer, and laid out again until all fit."""
    titled = [(axis, axis.title.get_text()) for axis in figure.axes if axis.title.get_text()]
    for axis, _ in titled:
        axis.title.set_text("")
    figure.tight_layout()
    for axis, text in titled:
        axis.title.set_text(text)
    for _ in range(rounds):
        figure.tight_layout()
        too_wide = [(axis, text) for axis, text in titled if title_room(figure, axis) < 0]
        if not too_wide:
            return
        for axis, text in too_wide:
            box, lines = axis.title.get_window_extent(), axis.title.get_text().split("\n")
            longest = max(len(line) for line in lines)
            room = box.width + title_room(figure, axis)
            axis.title.set_text(textwrap.fill(text, max(8, int(longest * room / box.width) - 1)))


def title_room(figure, axis) -> float:
    """Pixels to spare on the tighter side of ``axis``'s title within the figure (negative: it sticks out)."""
    box, frame = axis.title.get_window_extent(), figure.bbox
    return 2 * min(box.x0 - frame.x0, frame.x1 - box.x1)


def plot_accuracy(stats: pd.DataFrame, path: Path, split: str = "test") -> None:
    """Accuracy of every method on the evaluation ``split``: with one label regime, the methods sorted along one
    axis, a dot and its spread each; with several, a line per method over the regimes."""
    if stats["regime"].nunique() == 1:
        plot_methods_sorted(stats, path, split)
    else:
        plot_accuracy_vs_labels(stats, path, split)


def plot_methods_sorted(stats: pd.DataFrame, path: Path, split: str) -> None:
    """One panel per (dataset, encoder, encoder seed) combination: methods sorted by mean accuracy, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(stats.groupby(list(CONTEXT), sort=False))
    rows = max(len(group) for _, group in groups)
    figure, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 1.2 + 0.35 * rows), squeeze=False)
    for axis, (context, group) in zip(axes[0], groups):
        group = group.sort_values("mean")
        honest = ~(group["uses_test"] | group["uses_all_labels"])
        colours = ["tab:blue" if h else "tab:gray" for h in honest]
        for row, (mean, spread, colour) in enumerate(zip(group["mean"], group["std"].fillna(0), colours)):
            axis.errorbar(mean, row, xerr=spread, fmt="o", color=colour, capsize=3)
        axis.set_yticks(
            range(len(group)), [f"{m} (n={n})" for m, n in zip(group["method"], group["seeds"])], fontsize=8
        )
        axis.set_xlabel(f"{split} accuracy (%), {group['regime'].iloc[0]} labels, mean ± std over seeds")
        axis.grid(axis="x", alpha=0.3)
        if len(groups) > 1:
            axis.set_title(context_heading(context), fontsize=9)
    save_figure(figure, path)


def plot_accuracy_vs_labels(stats: pd.DataFrame, path: Path, split: str) -> None:
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
        style = {
            "linestyle": LINE_STYLES[number // 10 % len(LINE_STYLES)],
            "marker": MARKERS[number // 10 % len(MARKERS)],
        }
        dodge = 0.3 * (number / max(len(lines) - 1, 1) - 0.5)  # side by side at each regime: error bars apart
        axes.errorbar(
            [x + dodge for x in range(len(regimes))],
            group["mean"],
            yerr=group["std"].fillna(0),
            capsize=3,
            label=label,
            **style,
        )
    axes.set_xticks(range(len(regimes)), [f"{r} labels" for r in regimes])
    axes.set_ylabel(f"{split} accuracy (%)")
    axes.set_title("accuracy vs. labels (mean ± std over seeds)")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(figure, path)


def plot_pretext_weights(results: pd.DataFrame, path: Path) -> bool:
    """Heatmap of mean pretext weight per class for the first weighted method (smallest regime) of the first
    (dataset, encoder, encoder seed) combination, a row per class named as the results name it (in the order of their
    ``classes``). False if none."""
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
    named = chosen["classes"].iloc[0]  # the dataset's class names, in class order (the context is one dataset)
    mean = mean.loc[[c for c in named if c in mean.index] + [c for c in mean.index if c not in named]]
    figure, axes = plt.subplots(figsize=(1.2 * mean.shape[1] + 3, 0.4 * mean.shape[0] + 2))
    image = axes.imshow(mean.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    axes.set_xticks(range(mean.shape[1]), mean.columns)
    axes.set_yticks(range(mean.shape[0]), mean.index)
    where = f" ({context_heading(context)})" if len(contexts(results)) > 1 else ""
    axes.set_title(f"{method}, {regime} labels{where}: mean weight per class", fontsize=9)
    figure.colorbar(image)
    save_figure(figure, path)
    return True


def plot_paired_differences(table: pd.DataFrame, path) -> None:
    """``paired_figure`` of ``table``, written to ``path``."""
    save_figure(paired_figure(table), path)


def paired_figure(table: pd.DataFrame):
    """One panel per reference: each method's mean paired difference with its 95% interval, sorted, a line at 0;
    primary comparisons (``role``) drawn with their Holm-adjusted interval, as squares, and named so. The figure is
    as wide as its longest row label needs, beside a plot of ``PLOT_INCHES``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = list(dict.fromkeys(table["reference"].map(lambda r: r.split(" (")[0])))
    several = table[["dataset", "encoder"]].drop_duplicates().shape[0] > 1
    regimes = table["regime"].nunique() > 1
    primary = table["role"] == PRIMARY if "role" in table else pd.Series(False, index=table.index)
    table = table.assign(
        primary=primary,
        low=table["holm_low"].where(primary, table["low"]) if primary.any() else table["low"],
        high=table["holm_high"].where(primary, table["high"]) if primary.any() else table["high"],
    )
    table = table.assign(
        label=[
            m
            + (f" @ {r}" if regimes else "")
            + (f", {d}" if several else "")
            + f" (n={n})"
            + (", primary, Holm" if p else "")
            for m, r, d, n, p in zip(*(table[c] for c in ("method", "regime", "dataset", "pairs", "primary")))
        ]
    )
    sizes = [int((table["reference"].str.split(" \\(").str[0] == r).sum()) for r in references]
    label_inches = LABEL_CHAR_INCHES * max(len(label) for label in table["label"])
    figure, axes = plt.subplots(
        len(references),
        1,
        figsize=(max(9.0, label_inches + PLOT_INCHES), 1.2 + 0.32 * sum(sizes) + 0.6 * len(references)),
        squeeze=False,
        gridspec_kw={"height_ratios": sizes},
    )
    for axis, reference in zip(axes[:, 0], references):
        part = table[table["reference"].str.split(" \\(").str[0] == reference].sort_values("difference")
        labels = part["label"].tolist()
        # the difference is rounded, its bounds are not: a zero-width interval may lie a rounding off the dot
        low = (part["difference"] - part["low"]).fillna(0).clip(lower=0)
        high = (part["high"] - part["difference"]).fillna(0).clip(lower=0)
        colours = [
            "tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray" for lo, hi in zip(part["low"], part["high"])
        ]
        for row, (x, below, above, colour, primary) in enumerate(
            zip(part["difference"], low, high, colours, part["primary"])
        ):
            axis.errorbar(
                x,
                row,
                xerr=[[below], [above]],
                fmt="s" if primary else "o",
                color=colour,
                capsize=3,
                elinewidth=2.5 if primary else 1.5,
            )
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_yticks(range(len(part)), labels, fontsize=8)
        axis.set_title(
            f"method − {part['reference'].iloc[0]}: mean paired difference, 95% interval (primary: "
            "Holm-adjusted; green: above 0, red: below)",
            fontsize=9,
        )
        axis.set_xlabel("accuracy points")
    return figure
