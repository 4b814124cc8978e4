#!/usr/bin/env python
"""Table of every stored encoder's probes: pretext, epochs, pretraining time, kNN and linear-probe accuracy.

.venv/bin/python scripts/pretext_table.py [--artifacts-dir outputs/artifacts] [--dataset fashion_mnist] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def encoder_rows(artifacts: Path, dataset: str) -> pd.DataFrame:
    rows = []
    for path in sorted((artifacts / "encoders").glob("*/manifest.json")):
        manifest = json.loads(path.read_text())
        config, metrics, timings = manifest["config"], manifest["metrics"], manifest["timings"]
        if config["dataset"] != dataset or config.get("max_steps_per_epoch") is not None:
            continue
        rows.append(
            {
                "pretext": config["pretext"]["name"] + (" (uses all labels)" if config.get("uses_labels") else ""),
                "encoder": config["encoder"]["name"],
                "epochs": config["pretext"]["epochs"],
                "pretrain minutes": round(timings["train_seconds"] / 60, 1),
                "kNN probe %": None if metrics["knn_accuracy"] is None else round(100 * metrics["knn_accuracy"], 2),
                "linear probe %": None
                if metrics["linear_accuracy"] is None
                else round(100 * metrics["linear_accuracy"], 2),
                "final loss": None if metrics["final_loss"] is None else round(metrics["final_loss"], 4),
                "device": manifest["runtime"]["device"],
                "artifact": manifest["name"],
            }
        )
    if not rows:
        raise SystemExit(f"no encoders for dataset {dataset} under {artifacts}/encoders")
    return pd.DataFrame(rows).sort_values("kNN probe %", ascending=False, na_position="last")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts-dir", default="outputs/artifacts")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    table = encoder_rows(Path(args.artifacts_dir), args.dataset).to_markdown(index=False)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
