"""The pretraining curve of a stored encoder: its loss per epoch, and its probe accuracies where they were measured."""

from __future__ import annotations

from typing import Any

# each probe's line; the kNN marker hollow and larger, so that equal scores show both
PROBES = {
    "knn_accuracy": {"label": "kNN probe", "color": "tab:green", "marker": "o", "markersize": 9, "fillstyle": "none"},
    "linear_accuracy": {"label": "linear probe", "color": "tab:red", "marker": "s", "markersize": 5},
}


def plot_pretraining(history: list[dict[str, Any]], title: str):
    """A figure of an encoder's manifest history (``metrics.history``): the loss of every epoch on the left axis; on
    a twin right axis, each probe's accuracy at the epochs it was measured (the last epoch holds the final probes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, loss_axis = plt.subplots(figsize=(7, 4))
    epochs = [entry["epoch"] for entry in history]
    loss_axis.plot(epochs, [entry["loss"] for entry in history], color="tab:blue", marker=".", label="loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axis.set_ylabel("pretext loss", color="tab:blue")
    loss_axis.grid(alpha=0.3)
    probe_axis = loss_axis.twinx()
    for key, style in PROBES.items():
        measured = [entry for entry in history if entry.get(key) is not None]
        if measured:
            epochs = [entry["epoch"] for entry in measured]
            probe_axis.plot(epochs, [100 * entry[key] for entry in measured], linestyle="--", **style)
    probe_axis.set_ylabel("probe accuracy (%)")
    probe_axis.set_ylim(-3, 103)  # 0 to 100 %, with room for the markers at either end
    lines = [*loss_axis.get_lines(), *probe_axis.get_lines()]
    loss_axis.legend(
        lines,
        [line.get_label() for line in lines],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15),
        ncols=len(lines),
        fontsize=8,
        frameon=False,
    )
    loss_axis.set_title(title, fontsize=9)
    return figure
