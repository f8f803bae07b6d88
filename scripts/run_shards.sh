#!/usr/bin/env bash
# Run one grasp stage as N local shards in parallel (the same split a SLURM job array makes):
#   scripts/run_shards.sh N grasp sketch --config C --run R
# Exits non-zero if any shard fails; a rerun skips the units that finished.
set -uo pipefail
shards="$1"; shift
pids=()
for ((i = 0; i < shards; i++)); do
  "$@" --shard "$i" --num-shards "$shards" --quiet &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit "$status"
