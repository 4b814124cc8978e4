#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite; extra arguments go to pytest.
# Usage: scripts/test.sh [pytest args ...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
