#!/usr/bin/env bash
# The Fashion-MNIST fusion comparison shown in README, over rotation + SimCLR + inpainting features:
# attention, concat and pretext matching at 1% and 10% labels; the other heads, pretext matching by
# every criterion (oracle included), each single pretext, the negative-transfer controls (random,
# noise added) and supervised training from scratch at 1%; three seeds each. Pretrains and caches
# whatever the store lacks first; extra key=value arguments go to every command (README's table:
# train.epochs=1). Usage: scripts/fusion_table.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=outputs/multirun/fusion_table
rm -rf "$sweep"
base="rotation,simclr,inpainting"
fuse=(.venv/bin/sslfuse fuse -m seed=0,1,2 "$@")
.venv/bin/sslfuse run "pretexts=[$base,random,noise]" "fusions=[concat]" "seeds=[0]" "$@" hydra.run.dir="$sweep/prepare"
rm -rf "$sweep/prepare"
"${fuse[@]}" labels.fraction=0.01,0.1 "pretexts=[$base]" fusion=attention,concat,select hydra.sweep.dir="$sweep/main"
"${fuse[@]}" labels.fraction=0.01 "pretexts=[$base,random],[$base,noise]" fusion=attention,concat,select hydra.sweep.dir="$sweep/controls"
"${fuse[@]}" labels.fraction=0.01 "pretexts=[$base,random]" fusion=single fusion.pretext=rotation,simclr,inpainting,random hydra.sweep.dir="$sweep/single"
"${fuse[@]}" labels.fraction=0.01 "pretexts=[$base]" fusion=select fusion.by=logme,knn,oracle hydra.sweep.dir="$sweep/matching"
"${fuse[@]}" labels.fraction=0.01 "pretexts=[$base]" fusion=gate,static,moe,mean,ensemble hydra.sweep.dir="$sweep/heads"
"${fuse[@]}" labels.fraction=0.01 fusion=supervised_scratch fusion.steps=600 fusion.refit=false hydra.sweep.dir="$sweep/scratch"
.venv/bin/sslfuse report "$sweep"
