#!/usr/bin/env bash
# Set everything up (idempotent) and run the default experiment; extra arguments go to `sslfuse run`.
# Usage: scripts/demo.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/sslfuse run "$@"
