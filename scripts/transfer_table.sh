#!/usr/bin/env bash
# Transfer: pretexts pretrained on Fashion-MNIST's training images, fused for scikit-learn's digits (8x8, resized to
# 28x28) at 1, 5 and 10 labels per class over 10 label seeds; each pretext alone, pretext matching and the heads.
# Pretraining runs once (the first run); the other runs reuse the stored encoders and features.
# Usage: scripts/transfer_table.sh [key=value ...]   (e.g. train.epochs_scale=5)
set -euo pipefail
cd "$(dirname "$0")/.."
out=outputs/runs/transfer_digits
kept=outputs/results/transfer_digits
rm -rf "$out"
seeds="[0,1,2,3,4,5,6,7,8,9]"
common=(dataset=digits pretrain_dataset=fashion_mnist "pretexts=[rotation,simclr,random]" "seeds=$seeds" "$@")
.venv/bin/sslfuse run "${common[@]}" labels.per_class=1 "fusions=[attention,concat,single]" hydra.run.dir="$out/1_per_class"
for n in 5 10; do
  .venv/bin/sslfuse run "${common[@]}" labels.per_class=$n "fusions=[attention,concat,select,single]" hydra.run.dir="$out/${n}_per_class"
done
.venv/bin/sslfuse report "$out"
mkdir -p "$kept"
cp "$out"/report.md "$out"/report.csv "$out"/*.png "$kept"/
