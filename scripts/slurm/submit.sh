#!/usr/bin/env bash
# Submit a whole grasp run to SLURM as jobs chained with afterok dependencies.
#
#   scripts/slurm/submit.sh CONFIG RUN [--shards N] [--retrain-shards M] [--score-shards S]
#       [--curation-shards C] [--partition P] [--from STAGE] [--until STAGE] [--dry-run]
#       [-- SBATCH OPTIONS...]
#
#   prepare ─ reference ─┬─ sketch (array N) ──┬─ fit-surrogate ─┬─ score (array S) ───────────┬─ report
#                        └─ retrain (array M) ─┘                 └─ select ─ curation (array C) ┘
#
# `reference` is one job, `grasp sketch --shard 0 --num-shards N`: it trains θ0 (RUN/reference,
# needed by both sketch and retrain-subsets) exactly once, and sketches shard 0 while it is at it
# (array task 0 of the sketch array then finds its units done). Without it θ0 would still be
# trained once (under a file lock), but every other array task would sit waiting for it. The
# sketch and retrain arrays then run side by side.
#
# Stages: prepare reference sketch retrain fit-surrogate score select curation report.
# --from/--until submit a contiguous part of that list; a stage before --from must be finished.
# Options after `--` go to every sbatch (e.g. -- --account=abc --gres=gpu:1 --qos=normal); the
# templates' #SBATCH lines are defaults that those override. GRASP (default: `grasp` on PATH)
# names the executable the jobs run; jobs inherit this shell's environment (sbatch --export=ALL).
# Logs: RUN/logs/<job name>-<job id>[_<array task>].out. Prints one line per job: stage, job id.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stages=(prepare reference sketch retrain fit-surrogate score select curation report)

usage() {
  sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() {
  echo "submit.sh: $*" >&2
  exit 2
}
# A submission failed half-way: say which jobs are already queued (they wait on each other).
abort() {
  echo "submit.sh: $*" >&2
  if [[ ${#submitted[@]} -gt 0 ]]; then
    echo "submit.sh: already submitted: ${submitted[*]} (scancel them, or fix and rerun: finished work is kept)" >&2
  fi
  exit 1
}
index_of() {
  local i
  for i in "${!stages[@]}"; do
    if [[ "${stages[$i]}" == "$1" ]]; then
      echo "$i"
      return
    fi
  done
  die "unknown stage '$1' (one of: ${stages[*]})"
}
positive() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive integer, got '$2'"
}

positional=()
shards=4
retrain_shards=""
score_shards=""
curation_shards=3
partition=""
from=prepare
until=report
dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --shards) shards="${2:-}"; shift 2 || usage ;;
    --retrain-shards) retrain_shards="${2:-}"; shift 2 || usage ;;
    --score-shards) score_shards="${2:-}"; shift 2 || usage ;;
    --curation-shards) curation_shards="${2:-}"; shift 2 || usage ;;
    --partition | -p) partition="${2:-}"; shift 2 || usage ;;
    --from) from="${2:-}"; shift 2 || usage ;;
    --until) until="${2:-}"; shift 2 || usage ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) positional+=("$1"); shift ;;
  esac
done
[[ ${#positional[@]} -eq 2 ]] || usage
retrain_shards="${retrain_shards:-$shards}"
score_shards="${score_shards:-$shards}"
positive --shards "$shards"
positive --retrain-shards "$retrain_shards"
positive --score-shards "$score_shards"
positive --curation-shards "$curation_shards"
first="$(index_of "$from")"
last="$(index_of "$until")"
[[ "$first" -le "$last" ]] || die "--from $from comes after --until $until"

# Jobs start in the submit directory, but make every path absolute so --chdir cannot break them.
CONFIG="$(realpath -m -- "${positional[0]}")"
RUN="$(realpath -m -- "${positional[1]}")"
[[ -f "$CONFIG" ]] || die "config not found: ${positional[0]}"
GRASP="${GRASP:-grasp}"
if [[ "$GRASP" == */* ]]; then
  GRASP="$(realpath -m -- "$GRASP")"
elif command -v "$GRASP" >/dev/null 2>&1; then
  GRASP="$(command -v "$GRASP")"
fi
if [[ "$dry_run" -eq 0 ]]; then
  command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
  [[ -x "$GRASP" ]] || die "grasp executable not found ('$GRASP'): put it on PATH or set GRASP=/path/to/grasp"
  mkdir -p "$RUN/logs"
fi
export CONFIG RUN GRASP

common=(--parsable --kill-on-invalid-dep=yes)
if [[ -n "$partition" ]]; then common+=(--partition="$partition"); fi
declare -A job_of=()
submitted=()

# submit NAME DEPENDENCIES ARRAY_SIZE SCRIPT [SCRIPT ARGS...]; ARRAY_SIZE 0 = a single job.
submit() {
  local name="$1" deps="$2" size="$3" script="$4"
  shift 4
  local idx
  idx="$(index_of "$name")"
  if [[ "$idx" -lt "$first" || "$idx" -gt "$last" ]]; then
    return
  fi
  local cmd=(sbatch "${common[@]}" --job-name="grasp-$name")
  if [[ "$size" -gt 0 ]]; then
    cmd+=(--array="0-$((size - 1))" --output="$RUN/logs/%x-%A_%a.out")
  else
    cmd+=(--output="$RUN/logs/%x-%j.out")
  fi
  local ids=() dep
  for dep in $deps; do
    if [[ -n "${job_of[$dep]:-}" ]]; then ids+=("${job_of[$dep]}"); fi
  done
  if [[ ${#ids[@]} -gt 0 ]]; then
    cmd+=(--dependency="afterok:$(IFS=:; echo "${ids[*]}")")
  fi
  cmd+=("${extra[@]}" "$here/$script" "$@")
  local id
  if [[ "$dry_run" -eq 1 ]]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    echo
    id="JOB_$name"
  else
    if ! id="$("${cmd[@]}")"; then
      abort "sbatch failed for stage $name"
    fi
    id="${id%%;*}"  # --parsable prints "id" or "id;cluster"
    [[ "$id" =~ ^[0-9]+$ ]] || abort "sbatch printed '$id' for stage $name, not a job id"
    printf '%-14s %s\n' "$name" "$id"
    submitted+=("$id")
  fi
  job_of[$name]="$id"
}

if [[ "$dry_run" -eq 1 ]]; then
  echo "# CONFIG=$(printf '%q' "$CONFIG") RUN=$(printf '%q' "$RUN") GRASP=$(printf '%q' "$GRASP")"
fi
submit prepare "" 0 stage.sbatch prepare
submit reference "prepare" 0 stage.sbatch sketch --shard 0 --num-shards "$shards"
submit sketch "reference" "$shards" sketch.sbatch
submit retrain "reference" "$retrain_shards" retrain.sbatch
submit fit-surrogate "sketch retrain" 0 stage.sbatch fit-surrogate
submit score "fit-surrogate" "$score_shards" score.sbatch
submit select "fit-surrogate" 0 stage.sbatch select
submit curation "select" "$curation_shards" retrain.sbatch --curation
submit report "score curation" 0 stage.sbatch report
if [[ "$dry_run" -eq 0 ]]; then
  echo "logs: $RUN/logs   progress: squeue -u \"\$USER\"; $GRASP status --config $CONFIG --run $RUN"
fi
