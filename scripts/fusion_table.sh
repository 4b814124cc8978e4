#!/usr/bin/env bash
# The Fashion-MNIST fusion comparison shown in README: every head over rotation + SimCLR + inpainting
# at 1% and 10% labels (3 seeds each), pretext matching (including the oracle), each single pretext,
# supervised training from scratch on the labeled images, and the negative-transfer controls (random,
# noise added). Pretrains and caches whatever the store lacks first; extra key=value arguments go to
# every command (README's table: train.epochs=1). Usage: scripts/fusion_table.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=outputs/multirun/fusion_table
rm -rf "$sweep"
base="rotation,simclr,inpainting"
fuse=(.venv/bin/sslfuse fuse -m labels.fraction=0.01,0.1 seed=0,1,2 "$@")
.venv/bin/sslfuse run "pretexts=[$base,random,noise]" "fusions=[concat]" "seeds=[0]" "$@" hydra.run.dir="$sweep/prepare"
rm -rf "$sweep/prepare"
"${fuse[@]}" "pretexts=[$base]" fusion=attention,gate,static,moe,concat,mean,ensemble,select hydra.sweep.dir="$sweep/heads"
"${fuse[@]}" "pretexts=[$base]" fusion=select fusion.by=logme,knn,oracle hydra.sweep.dir="$sweep/matching"
"${fuse[@]}" "pretexts=[$base,random]" fusion=single fusion.pretext=rotation,simclr,inpainting,random hydra.sweep.dir="$sweep/single"
"${fuse[@]}" "pretexts=[$base,random],[$base,noise]" fusion=attention,concat,select hydra.sweep.dir="$sweep/controls"
"${fuse[@]}" fusion=supervised_scratch hydra.sweep.dir="$sweep/scratch"
.venv/bin/sslfuse report "$sweep"
