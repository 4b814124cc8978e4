#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite; extra arguments go to pytest.
# Usage: scripts/test.sh [--fast] [pytest args ...]
#   scripts/test.sh          every test (CI runs this: .ci/run), then the 25 slowest
#   scripts/test.sh --fast   only the tests not marked slow (a few minutes on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = "--fast" ]; then
  shift
  select=(-m "not slow")
fi
scripts/setup.sh
# One BLAS/OpenMP thread per test process unless set: on cores shared with other work, a second intra-op thread mostly
# spins at each op's barrier (a 40-step pretext test: ~1 s with one thread, 10-100 s with two on a loaded 2-core box).
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest --durations=25 "${select[@]}" "$@"
