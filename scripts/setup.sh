#!/usr/bin/env bash
# Idempotent set-up: Debian's Fashion-MNIST, a virtual environment in .venv, sslfuse installed in it.
# A second run does nothing that is already done. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
      || echo "setup: could not install dataset-fashion-mnist; sslfuse will use torchvision's download or data_dir"
  else
    echo "setup: dataset-fashion-mnist is not installed (needs root + apt-get); sslfuse will use torchvision's download or data_dir"
  fi
fi

stamp=.venv/.sslfuse-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "setup: installing sslfuse and its dependencies into .venv (torch takes about a minute)"
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import ssl_fusion, torch, torchvision, hydra" 
  echo "$wanted" > "$stamp"
fi
