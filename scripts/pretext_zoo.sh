#!/usr/bin/env bash
# Pretrain every pretext that runs on Fashion-MNIST with its default recipe (skipping stored encoders),
# then print the probe table of README's "Pretexts" section from the encoders' manifests.
# Usage: scripts/pretext_zoo.sh [key=value ...]   (e.g. preset=full, artifacts_dir=...)
set -euo pipefail
cd "$(dirname "$0")/.."
pretexts=(rotation inpainting simclr denoising jigsaw relative_location vicreg supervised random)
for pretext in "${pretexts[@]}"; do
  .venv/bin/sslfuse pretrain pretext="$pretext" "$@"
done
artifacts=outputs/artifacts
for arg in "$@"; do
  case "$arg" in artifacts_dir=*) artifacts="${arg#artifacts_dir=}" ;; esac
done
.venv/bin/python scripts/pretext_table.py --artifacts-dir "$artifacts" --out "$artifacts/pretext_table.md"
