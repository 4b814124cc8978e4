#!/usr/bin/env bash
# The check of one CUDA machine, offline, in under 5 minutes: one rotation epoch of a ResNet-18 in bf16 on Fashion-MNIST
# (Debian's files in /usr/share/datasets/fashion-mnist, else the synthetic dataset), caching its features and those
# of an external torchvision ResNet-50 at 224 px (random weights saved to a local checkpoint), a fuse of both; then
# each stage's images/s against a plain PyTorch loop on the same model and batch (synchronised timers, outputs kept,
# full-batch warm-up), measured in the same run, with steps/s, host syncs per training step and peak GPU memory.
# Prints one Markdown table and writes it to $OUT (else outputs/gpu_check/) as gpu_check.md (and gpu_check.json).
#
# Usage: scripts/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh   # a dry run of the same code on tiny sizes, on the CPU
#   PYTHON picks the interpreter (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
device=${GPU_CHECK_DEVICE:-cuda}
case "$device" in
  cuda)
    if [ "$("$python" -c 'import torch; print(torch.cuda.is_available())')" != "True" ]; then
      echo "gpu_check.sh: no CUDA device here (torch.cuda.is_available() is False); GPU_CHECK_DEVICE=cpu runs the tiny dry run" >&2
      exit 2
    fi ;;
  cpu) ;;
  *) echo "gpu_check.sh: GPU_CHECK_DEVICE must be cuda or cpu, not '$device'" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE=1 TORCH_HOME="${TORCH_HOME:-$PWD/outputs/torch_home}"  # nothing is downloaded
exec "$python" scripts/gpu_check.py --device "$device" --out "${OUT:-outputs/gpu_check}"
