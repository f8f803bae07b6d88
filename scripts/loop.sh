#!/usr/bin/env bash
# The closed loop, locally: R rounds of (measure the proposal and its neighbours -> refit -> select).
#   scripts/loop.sh ROUNDS SHARDS GRASP --config C --run R
# Each round's retraining runs as SHARDS local shards (on SLURM: submit retrain.sbatch --loop as an
# array, then fit-surrogate and select, once per round). Rerunning continues where it stopped.
set -euo pipefail
rounds="$1"; shards="$2"; grasp="$3"; shift 3
here="$(cd "$(dirname "$0")" && pwd)"
for ((round = 1; round <= rounds; round++)); do
  "$here/run_shards.sh" "$shards" "$grasp" retrain-subsets --loop "$@"
  "$grasp" fit-surrogate "$@" --quiet
  "$grasp" select "$@" --quiet
done
