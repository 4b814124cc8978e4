#!/usr/bin/env python
"""Every design choice of the paper-claims study, made on the dev split: each variant tried, with its dev score.

The design seeds are encoder seed 0 and label seeds 0, 1, 2; every fuse scores ``evaluation.split=dev`` (10% of each
class of the training split, held out of the labels and of everything a head is fit on). The confirmatory study
(``conf/study/paper_claims.yaml``) runs on other encoder and label seeds; only its frozen choices see the test split.

Each question is a list of variants, each a list of ``sslfuse`` commands (``run`` with its fusions, or ``fuse`` over
the label seeds). A variant's fuses go to ``outputs/design_dev/<question>/<variant>/`` and are reused when present, so
an interrupted run resumes. Every result lands in ``outputs/results/design_dev/variants.csv`` (one row per fuse) and
its means in ``summary.csv``.

    .venv/bin/python scripts/design_dev.py                       # every question
    .venv/bin/python scripts/design_dev.py --only length harmful # some questions
    .venv/bin/python scripts/design_dev.py --list                # the variants, without running
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ssl_fusion.report.results import collect_results

OUT = Path("outputs/design_dev")
TABLE = Path("outputs/results/design_dev")
LABEL_SEEDS = "0,1,2"
DEV = ["evaluation.split=dev", "encoder_seed=0"]
CELLS = {  # the study's two primary cells
    "fashion_mnist 1%": ["dataset=fashion_mnist", "labels.fraction=0.01"],
    "digits 5/class": ["dataset=digits", "pretrain_dataset=fashion_mnist", "labels.per_class=5"],
}
EPOCHS = "train.epochs=1"  # the pretraining length chosen by the ``length`` question
EPOCH_CHOICES = {1: "rotation,simclr", 2: "rotation,simclr", 4: "simclr"}
MAIN = "rotation,simclr,random"
HARMFUL = "shuffled_labels,jigsaw"


@dataclass(frozen=True)
class Variant:
    question: str
    name: str
    stage: str  # run | fuse
    pretexts: str  # comma-separated, as pretexts=[...] takes them
    overrides: tuple[str, ...]

    def commands(self, cell: list[str]) -> list[list[str]]:
        pretexts = f"pretexts=[{self.pretexts}]"
        if self.stage == "run":
            return [["sslfuse", "run", f"seeds=[{LABEL_SEEDS}]", *DEV, *cell, pretexts, *self.overrides]]
        cache = ["sslfuse", "cache", *DEV[1:], *[c for c in cell if not c.startswith("labels.")], pretexts, EPOCHS]
        fuse = ["sslfuse", "fuse", "-m", f"seed={LABEL_SEEDS}", *DEV, *cell, EPOCHS, pretexts, *self.overrides]
        return [cache, fuse]


def length_variants() -> list[Variant]:
    """How long to pretrain: rotation and SimCLR at 1 and 2 epochs, SimCLR also at 4 (rotation's four epochs did not
    fit the budget), each scored by its own linear head."""
    return [
        Variant("length", f"epochs={e}", "run", pretexts, ("fusions=[single]", f"train.epochs={e}"))
        for e, pretexts in EPOCH_CHOICES.items()
    ]


def harmful_variants() -> list[Variant]:
    """Candidate harmful encoders: each alone, beside the main pretexts and the untrained control."""
    candidates = "random,shuffled_labels,jigsaw,denoising"
    return [Variant("harmful", "candidates", "run", candidates, ("fusions=[single]", EPOCHS))]


def head_variants() -> list[Variant]:
    """Each head over the main pretexts and over them plus the harmful encoders, with the screen on and off."""
    heads = {
        "attention": ["fusion=attention"],
        "attention uniform": ["fusion=attention", "fusion.scorer=uniform"],
        "concat": ["fusion=concat"],
        "concat dropout": ["fusion=concat", "fusion.pretext_dropout=0.5"],
        "paper_attention": ["fusion=paper_attention"],
        "group_lasso": ["fusion=group_lasso"],
        "logreg_cv": ["fusion=logreg_cv"],
    }
    variants = []
    for inputs, pretexts in (("main", MAIN), ("harmful", f"{MAIN},{HARMFUL}")):
        for screen in ("true", "false"):
            for head, options in heads.items():
                name = f"{head} | {inputs} | screen={screen}"
                variants.append(Variant("heads", name, "fuse", pretexts, (*options, f"fusion.screen={screen}")))
    return variants


QUESTIONS = {"length": length_variants, "harmful": harmful_variants, "heads": head_variants}


def folder_of(variant: Variant, cell: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{variant.name}__{cell}")
    return OUT / variant.question / slug


def run_variant(variant: Variant, cell: str) -> Path:
    """The variant's fuses in ``cell``, made unless a finished folder holds them."""
    folder = folder_of(variant, cell)
    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for command in variant.commands(CELLS[cell]):
        where = ["hydra.sweep.dir=" + str(folder / "fuse"), "hydra.sweep.subdir=${hydra.job.num}"]
        where = where if "-m" in command else ["hydra.run.dir=" + str(folder / command[1])]
        print(" ".join(command), flush=True)
        executable = str(Path(sys.executable).with_name(command[0]))  # the sslfuse beside this Python
        subprocess.run([executable, *command[1:], *where], check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    (folder / "done").touch()
    return folder


def table(variants: list[Variant]) -> pd.DataFrame:
    rows = []
    for variant in variants:
        for cell in CELLS:
            folder = folder_of(variant, cell)
            if not (folder / "done").exists():
                continue
            frame = collect_results(folder)
            frame.insert(0, "cell", cell)
            frame.insert(0, "variant", variant.name)
            frame.insert(0, "question", variant.question)
            rows.append(frame)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(QUESTIONS), default=list(QUESTIONS))
    parser.add_argument("--cells", nargs="*", choices=sorted(CELLS), default=list(CELLS))
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table", action="store_true", help="only collect the variants run so far into the tables")
    parser.add_argument("--match", default="", help="only the variants whose name holds this text")
    args = parser.parse_args()
    variants = [v for question in args.only for v in QUESTIONS[question]() if args.match in v.name]
    if args.list:
        for variant in variants:
            print(variant.question, "|", variant.name)
        return
    for variant in [] if args.table else variants:
        for cell in args.cells:
            try:
                run_variant(variant, cell)
            except subprocess.CalledProcessError as err:
                print(f"variant '{variant.name}' in {cell} failed: {err}", file=sys.stderr)
    results = table([v for question in QUESTIONS for v in QUESTIONS[question]()])
    TABLE.mkdir(parents=True, exist_ok=True)
    results = results.rename(columns={"dev_accuracy": "accuracy", "dev_macro_f1": "macro_f1"})  # never the test split
    keep = [
        "question",
        "variant",
        "cell",
        "method",
        "pretexts",
        "seed",
        "encoder_seed",
        "split",
        "accuracy",
        "macro_f1",
    ]
    results = results[keep]
    results.to_csv(TABLE / "variants.csv", index=False)
    summary = (
        results.groupby(["question", "variant", "cell", "method"], sort=False)["accuracy"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    summary.to_csv(TABLE / "summary.csv", index=False)
    (TABLE / "summary.md").write_text(markdown(summary))
    print(summary.to_string(index=False))


def markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table: dev accuracy (%) mean ± std over the label seeds."""
    lines = ["| question | variant | cell | method | dev accuracy (%) | n |", "|:--|:--|:--|:--|--:|--:|"]
    for row in summary.itertuples():
        spread = f" ± {100 * row.std:.2f}" if row.count > 1 else ""
        score = f"{100 * row.mean:.2f}{spread}"
        variant = row.variant.replace("|", "\\|")  # a cell of a Markdown table
        lines.append(f"| {row.question} | {variant} | {row.cell} | {row.method} | {score} | {row.count} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
