#!/usr/bin/env bash
# The paper's claims on Fashion-MNIST, paired over 2 encoder seeds x 3 label seeds: the default pretexts
# (rotation, SimCLR, the untrained control) with preset=full encoders, at 1% labels (every head) and at 10% (attention,
# concat, pretext matching, each pretext alone). Pretrains and caches whatever the store lacks first.
# Usage: scripts/claims_fashion.sh [key=value ...]   (extra keys go to every command)
set -euo pipefail
cd "$(dirname "$0")/.."
out=outputs/runs/claims_fashion
kept=outputs/results/claims_fashion
rm -rf "$out"
common=(preset=full "encoder_seeds=[0,1]" "seeds=[0,1,2]" "$@")
.venv/bin/sslfuse run "${common[@]}" labels.fraction=0.01 \
  "fusions=[attention,paper_attention,concat,select,single,mean,ensemble]" hydra.run.dir="$out/1_percent"
.venv/bin/sslfuse run "${common[@]}" labels.fraction=0.1 "fusions=[attention,concat,select,single]" hydra.run.dir="$out/10_percent"
.venv/bin/sslfuse report "$out"
mkdir -p "$kept"
cp "$out"/report.md "$out"/*.csv "$out"/*.png "$kept"/
