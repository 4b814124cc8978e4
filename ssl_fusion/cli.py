"""The ``sslfuse`` command: ``sslfuse <stage> key=value ...``; each stage is a Hydra app."""

from __future__ import annotations

import importlib
import sys

from ssl_fusion.errors import UserError

STAGES = {
    "pretrain": "train one encoder on a pretext task and store it   (sslfuse pretrain pretext=rotation)",
    "cache": "write frozen features of stored encoders            (sslfuse cache pretexts=[rotation,simclr])",
    "fuse": "train a fusion head on cached features, evaluate    (sslfuse fuse fusion=attention labels.fraction=0.01)",
    "run": "pretrain + cache what is missing, fuse, print table (sslfuse run, sslfuse run preset=smoke)",
    "report": "aggregate results under a folder into tables       (sslfuse report outputs/multirun/...)",
}

USAGE = "usage: sslfuse <stage> [key=value ...] [--cfg job] [-m]\n\nstages:\n" + "\n".join(
    f"  {name:<9} {text}" for name, text in STAGES.items()
) + "\n\n`sslfuse <stage> --help` shows a stage's config and options; `-m` runs a Hydra multirun sweep."


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"sslfuse: error: unknown stage '{stage}'; valid stages: {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    if stage == "report":
        from ssl_fusion import report

        try:
            report.main(rest)
        except UserError as err:
            print(f"sslfuse report: error: {err}", file=sys.stderr)
            sys.exit(2)
        return
    module = importlib.import_module(f"ssl_fusion.stages.{stage}")
    sys.argv = [f"sslfuse-{stage}", *rest]
    module.main()


if __name__ == "__main__":
    main()
