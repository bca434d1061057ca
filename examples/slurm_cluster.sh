#!/usr/bin/env bash
# Segment many volumes with a Slurm job array: every array task embeds and
# clusters its own share of the inputs. hypseg reads SLURM_ARRAY_TASK_ID,
# SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_MIN itself: the sorted inputs
# are dealt round-robin, input i to part i mod COUNT, part = TASK_ID - MIN
# (so --array=0-9 and --array=1-10 both give parts 0..9).
#
#   mkdir -p logs && sbatch examples/slurm_cluster.sh
#
# Resubmit the same script after a crash, a timeout or a failed task: cluster
# skips every volume whose outputs are complete (--skip-existing is its
# default) and embed finds finished embeddings in the shared cache, so only
# what is missing is redone. A failing volume does not stop its task: it is
# reported in the log, the others are processed, and the task exits non-zero.
# Every task appends a record (versions, options, input hashes, timings, part,
# exit status) to $OUT/hypseg-runs.jsonl; concurrent appends are safe.
#
# Pooled centroids (the same label numbers in every volume) need all inputs at
# once, so they take two steps, with the same k (HYPSEG_EXAMPLE_KS, default 2 4 8):
#   1. one job:   hypseg cluster "$DATA" -m "$MODEL" --k 2 --k 4 --k 8 --fit-on pooled --num-parts 1 -o fit
#   2. the array: HYPSEG_EXAMPLE_CENTROIDS=fit/centroids.json sbatch examples/slurm_cluster.sh
#
#SBATCH --job-name=hypseg
#SBATCH --array=0-9
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --output=logs/hypseg-%A_%a.log
# For a GPU partition add: #SBATCH --gres=gpu:1   (--device auto then uses it)
#
# Everything below can be overridden from the environment (the project's tests
# run this script with bash, on tiny data, setting SLURM_ARRAY_TASK_* by hand).
set -uo pipefail

HYPSEG=${HYPSEG:-hypseg}                          # the command, e.g. "python -m hypsegcli"
# one executable (its path may hold spaces), or else words split at blanks
if [[ -x "$HYPSEG" ]]; then hypseg=("$HYPSEG"); else read -ra hypseg <<< "$HYPSEG"; fi
DATA=${HYPSEG_EXAMPLE_DATA:-data/images}          # a folder of volumes (or a file, or a glob)
MODEL=${HYPSEG_EXAMPLE_MODEL:-model.pt}           # from `hypseg train`
OUT=${HYPSEG_EXAMPLE_OUT:-seg}                    # one output folder shared by all tasks
KS=${HYPSEG_EXAMPLE_KS:-"2 4 8"}                  # the levels to segment
PATCH=${HYPSEG_EXAMPLE_PATCH_SIZE:-5}             # side of the patch embedded around each voxel
CENTROIDS=${HYPSEG_EXAMPLE_CENTROIDS:-}           # pooled centroids to apply (step 2 above)
THREADS=${SLURM_CPUS_PER_TASK:-2}
# The embedding cache on a shared scratch file system; all tasks may use it at once.
export HYPSEG_CACHE_DIR=${HYPSEG_CACHE_DIR:-${SCRATCH:-$PWD}/hypseg-cache}

cluster_args=(-o "$OUT" --threads "$THREADS" --patch-size "$PATCH")
for k in $KS; do cluster_args+=(--k "$k"); done
if [[ -n "$CENTROIDS" ]]; then cluster_args+=(--centroids "$CENTROIDS"); fi

echo "task ${SLURM_ARRAY_TASK_ID:-?} of array ${SLURM_ARRAY_JOB_ID:-?} on $(hostname)" >&2
status=0
step() {  # run a command, go on if it fails; exit 1 if a step had a runtime failure, else 2 for bad input
    "$@"
    local code=$?
    if (( code != 0 && status != 1 )); then status=$code; fi
}
# 1. This task's embeddings into the cache (optional: cluster embeds too, but a
#    filled cache makes clustering again at other k cost no encoder work).
step "${hypseg[@]}" embed "$DATA" -m "$MODEL" --threads "$THREADS" --patch-size "$PATCH" --skip-existing
# 2. This task's segmentations (volumes already complete in $OUT are skipped).
step "${hypseg[@]}" cluster "$DATA" -m "$MODEL" "${cluster_args[@]}"
exit "$status"
