#!/usr/bin/env bash
# The Fashion-MNIST fusion comparison shown in README, over rotation + SimCLR + inpainting features:
# every head, each single pretext and supervised training from scratch at 1% and 10% labels; pretext
# matching by every criterion (oracle included) and the negative-transfer controls (random, noise
# added) at 1%; three seeds each. Pretrains and caches
# whatever the store lacks first; extra key=value arguments go to every command (README's tables:
# train.epochs=1, and preset=full train.epochs_scale=5 for five-epoch encoders). Sweep jobs run two at a
# time (hydra/launcher=local, needs the launchers extra). Usage: scripts/fusion_table.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=outputs/multirun/fusion_table
rm -rf "$sweep"
base="rotation,simclr,inpainting"
fuse=(.venv/bin/sslfuse fuse -m hydra/launcher=local hydra.launcher.n_jobs=2 seed=0,1,2 "$@")
.venv/bin/sslfuse run "pretexts=[$base,random,noise]" "fusions=[concat]" "seeds=[0]" "$@" hydra.run.dir="$sweep/prepare"
rm -rf "$sweep/prepare"
"${fuse[@]}" labels.fraction=0.01,0.1 "pretexts=[$base]" fusion=attention,concat,select hydra.sweep.dir="$sweep/main"
"${fuse[@]}" labels.fraction=0.01 "pretexts=[$base,random],[$base,noise]" fusion=attention,concat,select hydra.sweep.dir="$sweep/controls"
"${fuse[@]}" labels.fraction=0.01,0.1 "pretexts=[$base,random]" fusion=single fusion.pretext=rotation,simclr,inpainting,random hydra.sweep.dir="$sweep/single"
"${fuse[@]}" labels.fraction=0.01 "pretexts=[$base]" fusion=select fusion.by=logme,knn,oracle hydra.sweep.dir="$sweep/matching"
"${fuse[@]}" labels.fraction=0.01,0.1 "pretexts=[$base]" fusion=gate,static,moe,mean,ensemble hydra.sweep.dir="$sweep/heads"
"${fuse[@]}" labels.fraction=0.01,0.1 fusion=supervised_scratch fusion.steps=600 fusion.refit=false hydra.sweep.dir="$sweep/scratch"
.venv/bin/sslfuse report "$sweep"
