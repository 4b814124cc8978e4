#!/usr/bin/env bash
# Reference row for every results table: the encoder trained from scratch, supervised, on the labeled images only
# (`sslfuse fuse fusion=supervised_scratch` at its default budget: conf/fusion/supervised_scratch.yaml), once per
# label seed, on the labeled subsets every head of the same regime and seed reads. One results.json per seed under
# OUT/<regime>/seed_<seed>/, which `sslfuse report` tables beside the heads.
#
# Usage: scripts/reference/supervised_scratch.sh OUT SEEDS REGIME [key=value ...]
#   OUT     folder receiving the results
#   SEEDS   label seeds, comma-separated: 0,1,2
#   REGIME  labels.fraction=<f> or labels.per_class=<n> (or labels.indices_file=<file>)
#   extra key=value arguments go to `sslfuse fuse` (dataset=..., encoder=..., device=...)
# e.g. scripts/reference/supervised_scratch.sh outputs/reference/scratch 0,1,2 labels.fraction=0.01
# PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '6,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
out=$1 seeds=$2 regime=$3
shift 3
case "$regime" in
  labels.fraction=*|labels.per_class=*|labels.indices_file=*) ;;
  *) echo "supervised_scratch.sh: REGIME must be labels.fraction=<f>, labels.per_class=<n> or labels.indices_file=<file>, not '$regime'" >&2; exit 2 ;;
esac
case "$seeds" in
  *[!0-9,]*|'') echo "supervised_scratch.sh: SEEDS must be comma-separated integers, not '$seeds'" >&2; exit 2 ;;
esac
python=${PYTHON:-.venv/bin/python}
tag=${regime#labels.}
tag=${tag//[^A-Za-z0-9_.-]/-}
written=()
for seed in ${seeds//,/ }; do
  folder="$out/$tag/seed_$seed"
  "$python" -m ssl_fusion.cli fuse fusion=supervised_scratch "$regime" "seed=$seed" "$@" "hydra.run.dir=$folder"
  written+=("$folder/results.json")
done
printf 'wrote %s\n' "${written[@]}"
