#!/usr/bin/env bash
# Negative transfer of every weighted head: each one over rotation + SimCLR + inpainting with and without the
# image-free noise pretext added, on Fashion-MNIST at 1% labels, three seeds; each with the screen (the default)
# and without it (fusion.screen=false).
# Jobs run two at a time (hydra/launcher=local, needs the launchers extra). The encoders and features must be
# stored (scripts/fusion_table.sh makes them); extra key=value arguments go to every command.
# Usage: scripts/negative_transfer.sh [key=value ...]   (README: as for scripts/fusion_table.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=outputs/multirun/negative_transfer
rm -rf "$sweep"
base="rotation,simclr,inpainting"
fuse=(.venv/bin/sslfuse fuse -m hydra/launcher=local hydra.launcher.n_jobs=2 seed=0,1,2 labels.fraction=0.01
      "pretexts=[$base],[$base,noise]" "$@")
"${fuse[@]}" fusion=attention,static,gate,moe,mean,ensemble fusion.screen=true,false hydra.sweep.dir="$sweep/heads"
.venv/bin/sslfuse report "$sweep"
