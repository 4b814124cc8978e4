#!/usr/bin/env bash
# Heads trained on cached augmented views (cache.views=4) against the same heads on plain features, and
# attention combining by concatenation or with pretext dropout, over rotation + SimCLR + inpainting on Fashion-MNIST: 1% labels,
# three seeds (the noise control: scripts/negative_transfer.sh). Caches whatever the store lacks first (the encoders
# must be stored: scripts/fusion_table.sh makes them); extra key=value arguments go to every command. Sweep jobs run
# two at a time (hydra/launcher=local, needs the launchers extra).
# Usage: scripts/views_table.sh [key=value ...]   (README: as for scripts/fusion_table.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=outputs/multirun/views_table
rm -rf "$sweep"
base="rotation,simclr,inpainting"
fuse=(.venv/bin/sslfuse fuse -m hydra/launcher=local hydra.launcher.n_jobs=2 seed=0,1,2 labels.fraction=0.01 "$@")
.venv/bin/sslfuse cache "pretexts=[$base]" cache.views=4 "$@" hydra.run.dir="$sweep/prepare"
rm -rf "$sweep/prepare"
"${fuse[@]}" "pretexts=[$base]" fusion=attention,concat,select cache.views=0,4 hydra.sweep.dir="$sweep/views"
"${fuse[@]}" "pretexts=[$base]" fusion=paper_attention fusion.combine=concat cache.views=0,4 hydra.sweep.dir="$sweep/combine"
"${fuse[@]}" "pretexts=[$base]" fusion=attention fusion.pretext_dropout=0.3 cache.views=0,4 hydra.sweep.dir="$sweep/dropout"
.venv/bin/sslfuse report "$sweep"
