#!/usr/bin/env bash
# The Fashion-MNIST fusion comparison shown in README: heads over rotation + SimCLR at 1% and 10%
# labels (3 seeds each), each single pretext, and the negative-transfer controls (random, noise added).
# Pretrains and caches whatever the store lacks first. Usage: scripts/fusion_table.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=outputs/multirun/fusion_table
rm -rf "$sweep"
fuse=(.venv/bin/sslfuse fuse -m labels.fraction=0.01,0.1 seed=0,1,2 "$@")
.venv/bin/sslfuse run "pretexts=[rotation,simclr,random,noise]" "fusions=[concat]" "seeds=[0]" "$@" hydra.run.dir="$sweep/prepare"
rm -rf "$sweep/prepare"
"${fuse[@]}" "pretexts=[rotation,simclr]" fusion=attention,gate,static,concat,mean,ensemble,select hydra.sweep.dir="$sweep/heads"
"${fuse[@]}" "pretexts=[rotation,simclr]" fusion=select fusion.by=oracle hydra.sweep.dir="$sweep/oracle"
"${fuse[@]}" fusion=single fusion.pretext=rotation,simclr,random hydra.sweep.dir="$sweep/single"
"${fuse[@]}" "pretexts=[rotation,simclr,random],[rotation,simclr,noise]" fusion=attention,concat,select hydra.sweep.dir="$sweep/controls"
.venv/bin/sslfuse report "$sweep"
