#!/usr/bin/env bash
# Negative transfer on Fashion-MNIST at 1% labels, paired over 2 encoder seeds x 3 label seeds: attention and concat
# over the default pretexts with and without the image-free noise pretext added, each with the screen (the default)
# and without it. Pretrains and caches what the store lacks first (scripts/claims_fashion.sh makes the same
# encoders). Jobs run two at a time (hydra/launcher=local, needs the launchers extra).
# Usage: scripts/claims_noise.sh [key=value ...]   (extra keys go to every command)
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=outputs/multirun/claims_noise
kept=outputs/results/claims_noise
rm -rf "$sweep"
base="rotation,simclr,random"
.venv/bin/sslfuse run preset=full "encoder_seeds=[0,1]" "seeds=[0]" "pretexts=[$base,noise]" "fusions=[concat]" \
  hydra.run.dir="$sweep/prepare" "$@"
rm -rf "$sweep/prepare"
.venv/bin/sslfuse fuse -m hydra/launcher=local hydra.launcher.n_jobs=2 preset=full encoder_seed=0,1 seed=0,1,2 \
  labels.fraction=0.01 "pretexts=[$base],[$base,noise]" fusion=attention,concat fusion.screen=true,false \
  hydra.sweep.dir="$sweep" "$@"
.venv/bin/sslfuse report "$sweep"
mkdir -p "$kept"
cp "$sweep"/report.md "$sweep"/*.csv "$sweep"/*.png "$kept"/
