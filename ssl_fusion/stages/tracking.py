"""The stages' side of experiment tracking (``ssl_fusion/runtime/tracking.py``, ``docs/tracking.md``): a stage's
tracker, and what one fuse and one pretraining record in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd
from omegaconf import DictConfig

from ssl_fusion.config import as_plain
from ssl_fusion.evaluation.result import PREDICTIONS_FILE, FuseResult
from ssl_fusion.runtime.tracking import Tracker, numeric, open_tracker
from ssl_fusion.store.files import MANIFEST

# a result's fields a fuse's run records as params: what ran, on what, how it is scored
RESULT_PARAMS = ("method", "title", "family", "split", "cached_views", "uses_test", "uses_all_labels", "commit")
NOT_PROBES = ("epoch_losses", "final_loss", "history", "probe")  # an encoder manifest's metrics that are no probe
CONTEXT_PARAMS = ("dataset", "pretraining_dataset", "encoder", "encoder_seed", "data_fingerprint")


def stage_tracker(cfg: DictConfig) -> Tracker:
    """The tracker ``tracking`` names (checked before any work); in a Hydra sweep its runs nest under the sweep's
    parent run. Relative store paths are read from the folder the command started in."""
    hydra = HydraConfig.get()
    start = Path(get_original_cwd())
    sweep = (start / hydra.sweep.dir).resolve() if hydra.mode == RunMode.MULTIRUN else None
    return open_tracker(cfg.tracking, start, sweep)


def flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """``{prefix.key: value}``, a nested dict's keys joined by dots."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= flat(f"{prefix}.{key}", value)
        else:
            out[f"{prefix}.{key}"] = value
    return out


def track_fuse(tracker: Tracker, fusion: Any, result: FuseResult, folder: Path) -> None:
    """One fuse's run: the head's options (``fusion.*``), its pretexts, label regime and seeds, what it ran on, its
    metrics and the settings its selection chose (``selected_l2``, ``selected_steps``, ...: metrics when numbers),
    with the files ``write_result`` wrote in ``folder`` (``results.json``, the predictions) as artifacts."""
    chosen = {key: value for key, value in result.selection.items() if numeric(value)}
    params = {
        **{key: getattr(result, key) for key in (*RESULT_PARAMS, *CONTEXT_PARAMS)},
        "pretexts": "+".join(result.pretexts),
        **result.labels,
        **{key: value for key, value in result.selection.items() if key not in chosen},
        **flat("fusion", {key: value for key, value in as_plain(fusion).items() if key != "name"}),
    }
    files = [folder / "results.json", *([folder / PREDICTIONS_FILE] if result.predictions is not None else [])]
    name = f"{result.method} seed {result.labels['seed']}"
    tracker.log_run(name, "fuse", params, {**result.metrics, **chosen, **result.evaluation}, files)


def track_pretraining(tracker: Tracker, folder: Path, manifest: dict[str, Any]) -> None:
    """One pretraining's run, from the manifest of the encoder it stored in ``folder``: the recipe (``pretext.*``),
    encoder, seed and data as params; each epoch of its history (loss, throughput, seconds, and the probe scores where
    measured) as metrics at the epoch's step, with the final probes at the last epoch's (step 0 for an encoder never
    trained, such as ``random``); its final loss and timings (``timings.*``) as metrics; the manifest and the files
    stored with the encoder but its weights (the history's plot) as artifacts."""
    config, metrics = manifest["config"], manifest["metrics"]
    params = {
        **flat("pretext", config["pretext"]),
        **flat("encoder", config["encoder"]),
        **{key: config[key] for key in ("seed", "dataset", "max_steps_per_epoch")},
    }
    epochs = {entry["epoch"]: {k: v for k, v in entry.items() if k != "epoch"} for entry in metrics["history"]}
    last = max(epochs, default=0)
    epochs[last] = {**epochs.get(last, {}), **{k: v for k, v in metrics.items() if k not in NOT_PROBES}}
    files = [folder / MANIFEST, *(folder / name for name in manifest["files"] if Path(name).suffix != ".pt")]
    scalars = {"final_loss": metrics["final_loss"], **flat("timings", manifest["timings"])}
    tracker.log_run(f"pretrain {folder.name}", "pretrain", params, scalars, files, epochs)
